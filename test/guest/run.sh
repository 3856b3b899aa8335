#!/bin/bash
# Runs sauve's LVM test in a QEMU guest. The host's kernel has no
# device-mapper, so LVM snapshots are tested in a Debian 12 guest under
# TCG (KVM guests hang here), whose kernel has it.
#
#   test/guest/run.sh            # as root; prints the guest's console
#
# The guest (kernel, initramfs, raw ext4 root) is built once by
# build-base.sh and cached in $SAUVE_GUEST_CACHE (default
# /var/cache/sauve-guest). Every run copies a fresh sauve ($SAUVE_BIN,
# else built static from this checkout), seqblk and guest-test.sh onto a
# small payload disk (/dev/vdc); the root disk is used through a
# throw-away overlay (snapshot=on) and the scratch disk for LVM (/dev/vdb)
# is new, so runs share nothing but the cached image.
#
# Exit status: 0 when the guest printed "SAUVE-GUEST-RESULT: PASS", 1 on
# FAIL, 2 when it printed neither (it crashed or ran out of time:
# $SAUVE_GUEST_TIMEOUT seconds, default 900). $SAUVE_GUEST_LOG, if set,
# gets a copy of the console.
#
# Other tests boot the same guest with a script of their own:
#
#   SAUVE_GUEST_SCRIPT=guest-qga.sh SAUVE_GUEST_STDIN=1 test/guest/run.sh [QEMU-ARGS...]
#
# runs that script of the payload instead of guest-test.sh (the kernel
# command line's sauve.script, which guest-init.sh reads), adds
# QEMU-ARGS to QEMU's command line (sockets, devices, more drives: the
# guest-freeze test's QMP and guest agent sockets and data drive) and,
# with SAUVE_GUEST_STDIN=1, gives QEMU this script's standard input, which
# the guest reads on its console (by default it reads nothing);
# SAUVE_GUEST_PAYLOAD=DIR adds DIR's files to the payload (the sauve
# agent test's keys, in DIR/agent). SAUVE_GUEST_ROOT=DRIVE replaces the
# root disk's -drive options (the instant-boot test boots the root disk
# from a writable NBD export of a snapshot of it: no snapshot=on then).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
timeout_s=${SAUVE_GUEST_TIMEOUT:-900}
script=${SAUVE_GUEST_SCRIPT:-guest-test.sh}

log() { echo "run.sh: $*" >&2; }

for p in qemu-system-x86_64 mkfs.ext4 timeout; do
	command -v "$p" >/dev/null || { log "$p is missing"; exit 2; }
done
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, and the cache in /var/cache)"; exit 2; }

start=$(date +%s)
base=$("$here/build-base.sh" | tail -n1)
log "base image $base ($(( $(date +%s) - start )) s)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sauve-guest.XXXXXX")
qemu_pid=
cleanup() {
	[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT

# The guest runs what is on the payload disk: static binaries (the
# guest has its own libc) and the test script. SAUVE_BIN=none puts no
# sauve there.
mkdir "$tmp/payload"
if [ "${SAUVE_BIN:-}" = none ]; then
	: # a test that runs sauve on the host, not in the guest
elif [ -n "${SAUVE_BIN:-}" ]; then
	cp "$SAUVE_BIN" "$tmp/payload/sauve"
	if ! file "$tmp/payload/sauve" 2>/dev/null | grep -q 'statically linked'; then
		ldd "$tmp/payload/sauve" >/dev/null 2>&1 && log "warning: $SAUVE_BIN is dynamically linked; build it with CGO_ENABLED=0"
	fi
else
	(cd "$top" && CGO_ENABLED=0 go build -o "$tmp/payload/sauve" ./cmd/sauve)
fi
for tool in seqblk seqfile; do
	(cd "$top" && CGO_ENABLED=0 go build -o "$tmp/payload/$tool" "./test/guest/$tool")
done
install -m 0755 "$here/guest-test.sh" "$here/guest-qga.sh" "$here/guest-writes.sh" "$tmp/payload/"
install -m 0644 "$here/steps.sh" "$tmp/payload/"
[ -n "${SAUVE_GUEST_PAYLOAD:-}" ] && cp -a "$SAUVE_GUEST_PAYLOAD/." "$tmp/payload/"
[ -x "$tmp/payload/$script" ] || { log "no test script $script in $here"; exit 2; }
mkfs.ext4 -q -L payload -d "$tmp/payload" "$tmp/payload.img" 128M >&2
truncate -s 4G "$tmp/scratch.img"
log "payload ready ($(( $(date +%s) - start )) s); booting the guest (TCG, timeout ${timeout_s} s)"

console=$tmp/console.log
input=/dev/null
[ "${SAUVE_GUEST_STDIN:-}" = 1 ] && input=/dev/stdin
boot=$(date +%s)
set +e
# The console goes out a line at a time (sed -u), for a test that reads
# it as the guest runs.
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
	-M q35 -accel tcg -cpu max -m 2048 -smp 2 \
	-nographic -no-reboot -nic none \
	-kernel "$base/vmlinuz" -initrd "$base/initrd.img" \
	-append "root=/dev/vda rw rootfstype=ext4 console=ttyS0 init=/guest-init.sh sauve.script=$script panic=1 quiet" \
	-drive "${SAUVE_GUEST_ROOT:-file=$base/root.img,format=raw,if=virtio,snapshot=on}" \
	-drive "file=$tmp/scratch.img,format=raw,if=virtio,cache=unsafe" \
	-drive "file=$tmp/payload.img,format=raw,if=virtio,readonly=on" \
	"$@" <"$input" 2>&1 | sed -u 's/\r//g' | tee "$console"
rc=${PIPESTATUS[0]}
set -e
[ -n "${SAUVE_GUEST_LOG:-}" ] && cp "$console" "$SAUVE_GUEST_LOG"
log "guest ran $(( $(date +%s) - boot )) s (qemu exit $rc), $(( $(date +%s) - start )) s in all"

result=$(grep -a '^SAUVE-GUEST-RESULT: ' "$console" | tail -n1 || true)
case "$result" in
"SAUVE-GUEST-RESULT: PASS") exit 0 ;;
"SAUVE-GUEST-RESULT: FAIL"*) exit 1 ;;
*)
	[ "$rc" = 124 ] && log "the guest did not finish in $timeout_s s"
	log "the guest printed no result line"
	exit 2
	;;
esac
