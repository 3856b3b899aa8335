#!/usr/bin/env bash
# instantboot.sh — issue 14's instant-recovery benchmark: seconds from
# starting 'sauve serve nbd --writable' to a booting Linux guest's first
# line of its own init, against booting the raw image directly.
#
#   bash bench/instantboot.sh     # as root; ROUNDS=3; writes bench/out/instantboot.md
#
# The guest is test/guest's cached Debian 12 (kernel, initramfs, raw ext4
# root; build-base.sh builds it once), its root disk backed up into a
# local repository under WORK. Each round, alternating which goes first:
#   direct     qemu-system-x86_64 (TCG) on the raw root image (snapshot=on)
#   sauve      sauve serve nbd --writable, then the same QEMU on the export
# both until the console shows "guest-init: kernel" (the root filesystem
# is mounted and its init runs). QEMU runs under TCG, as everywhere here:
# the times are the guest's CPU-bound boot more than I/O, so the
# difference between the two is what serving from the repository adds.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/sauve-instantboot}
ROUNDS=${ROUNDS:-3}
OUT=bench/out
[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
base=$(bash test/guest/build-base.sh | tail -n1)
mkdir -p "$WORK/bin" "$OUT"
go build -o "$WORK/bin/sauve" ./cmd/sauve
S=$WORK/bin/sauve
export XDG_CONFIG_HOME=$WORK/cfg XDG_CACHE_HOME=$WORK/cache SAUVE_REPO=$WORK/repo SAUVE_PASSPHRASE=
if [ ! -f "$WORK/done" ]; then
  rm -rf "$WORK/repo" "$WORK/cfg" "$WORK/cache"
  "$S" init > /dev/null
  "$S" backup "$base/root.img" > /dev/null
  touch "$WORK/done"
fi
now() { date +%s.%N; }
# boot DRIVE: seconds until the marker (QEMU is killed then).
boot() {
  local t0=$1 drive=$2 log=$WORK/console.log
  : > "$log"
  qemu-system-x86_64 -M q35 -accel tcg -cpu max -m 2048 -smp 2 -nographic -no-reboot -nic none \
    -kernel "$base/vmlinuz" -initrd "$base/initrd.img" \
    -append "root=/dev/vda rw rootfstype=ext4 console=ttyS0 init=/guest-init.sh panic=1 quiet" \
    -drive "$drive" > "$log" 2>&1 &
  local q=$!
  for _ in $(seq 3000); do
    grep -q "guest-init: kernel" "$log" && break
    sleep 0.1
  done
  local t1; t1=$(now)
  kill "$q" 2>/dev/null; wait "$q" 2>/dev/null || true
  grep -q "guest-init: kernel" "$log" || { echo "no boot marker:" >&2; tail -20 "$log" >&2; exit 1; }
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'
}
direct=() sauve=()
run_direct() { direct+=("$(boot "$(now)" "file=$base/root.img,format=raw,if=virtio,snapshot=on")"); }
run_sauve() {
  local sock=$WORK/nbd.sock t0; rm -f "$sock" "$WORK/root.overlay"
  t0=$(now)
  "$S" serve nbd latest --writable --overlay "$WORK/root.overlay" --listen "unix:$sock" 2> "$WORK/serve.log" &
  local pid=$!
  for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.05; done
  sauve+=("$(boot "$t0" "file=nbd:unix:$sock:exportname=root.img,format=raw,if=virtio,cache=writeback")")
  kill -INT "$pid"; wait "$pid" || true
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then run_direct; run_sauve; else run_sauve; run_direct; fi
  echo "== round $r: direct ${direct[-1]} s, sauve ${sauve[-1]} s"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
{
  echo "## Instant boot from a snapshot ($(date +%F), $(nproc) cores, QEMU TCG)"
  echo
  echo "Command: \`ROUNDS=$ROUNDS bash bench/instantboot.sh\` (sauve $(git rev-parse --short HEAD), $(qemu-system-x86_64 --version | head -1)). Seconds to the guest's init, medians of $ROUNDS."
  echo
  echo "| boot | median s | rounds |"
  echo "|---|---|---|"
  echo "| raw image, directly | $(median "${direct[@]}") | ${direct[*]} |"
  echo "| sauve serve nbd --writable, from the repository | $(median "${sauve[@]}") | ${sauve[*]} |"
} | tee "$OUT/instantboot.md"
