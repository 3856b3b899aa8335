#!/bin/bash
# Builds (once) the cached Debian 12 guest that test/guest/run.sh boots:
# a raw ext4 root image, its kernel and initramfs. The cache entry is
# keyed by a hash of everything that decides its contents (the package
# list, the suite, the mirror and this file), so a change to any of them
# builds a new entry and an unchanged one is never rebuilt.
#
# Prints the cache entry's directory on stdout (the last line).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${SAUVE_GUEST_CACHE:-/var/cache/sauve-guest}
suite=bookworm
# The packages the guest needs beyond minbase: a kernel whose modules
# hold dm-snapshot and dm-thin-pool, the LVM and thin tools, mkfs.ext4,
# and the QEMU guest agent (qemu-ga, for the guest-freeze test).
# initramfs-tools (pulled in by the kernel) brings udev and kmod.
packages=linux-image-amd64,lvm2,thin-provisioning-tools,e2fsprogs,kmod,qemu-guest-agent
# recipe names the steps below: bump it when they change the image.
recipe=2

log() { echo "build-base: $*" >&2; }

# mirror is the Debian archive this machine's apt uses, so the guest
# comes from the same place (and the only network there is).
mirror() {
	local m
	m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
		grep -v '^[[:space:]]*#' |
		grep -Eo 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ') || true
	echo "${SAUVE_GUEST_MIRROR:-${m:-http://deb.debian.org/debian}}"
}

url=$(mirror)
key=$( { echo "$suite $packages $url $recipe"; cat "$here/guest-init.sh"; } | sha256sum | cut -c1-16)
out=$cache/base-$key
if [ -f "$out/done" ]; then
	log "cached: $out"
	echo "$out"
	exit 0
fi

if ! command -v debootstrap >/dev/null; then
	log "installing debootstrap"
	apt-get install -y -q debootstrap >&2 || { apt-get update -q >&2 && apt-get install -y -q debootstrap >&2; }
fi
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap)"; exit 1; }

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
log "debootstrap $suite from $url into $root (packages: $packages)"
start=$(date +%s)
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$url" >"$work/debootstrap.log" 2>&1 || {
	tail -n 30 "$work/debootstrap.log" >&2
	log "debootstrap failed (log above)"
	exit 1
}
log "debootstrap took $(( $(date +%s) - start )) s"

# No udev runs in the guest (init is a script), so LVM makes its own
# device nodes and does not wait for udev to confirm them.
cat >>"$root/etc/lvm/lvm.conf" <<'CONF'
# sauve guest: no udev.
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
devices {
	obtain_device_list_from_udev = 0
}
CONF
install -m 0755 "$here/guest-init.sh" "$root/guest-init.sh"
echo sauve-guest >"$root/etc/hostname"

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n1)
mkdir -p "$work/out"
cp "$kernel" "$work/out/vmlinuz"
cp "$initrd" "$work/out/initrd.img"
# Drop what the guest never reads, so the image is small.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
size=$(( $(du -sm "$root" | cut -f1) + 300 ))
mkfs.ext4 -q -F -L sauve-guest -d "$root" "$work/out/root.img" "${size}M" >&2
cp "$work/debootstrap.log" "$work/out/"
echo "$suite $packages $url" >"$work/out/packages"
date -u +%FT%TZ >"$work/out/done"
rm -rf "$out"
mv "$work/out" "$out"
# One guest is enough: entries of other package lists or recipes go.
for old in "$cache"/base-*; do
	[ "$old" = "$out" ] || rm -rf "$old"
done
log "built $out ($(du -sh "$out" | cut -f1)) in $(( $(date +%s) - start )) s"
echo "$out"
