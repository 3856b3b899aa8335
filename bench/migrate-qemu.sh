#!/usr/bin/env bash
# migrate-qemu.sh — issue 15's benchmark of 'sauve migrate qemu:SOCKET':
# the reference disk (day 1) as the qcow2 drive of a running QEMU VM (TCG,
# no guest OS: the drive is written through the monitor's qemu-io, as a
# guest would write it); a first pass into a qcow2 target; day 2's churn
# (every 64 KiB block that differs between day1.img and day2.img, about
# 2% of the disk) written into the drive with day 2's bytes; a delta pass
# with the dirty bitmap; then the same churn undone (day 1's bytes back)
# and a delta pass with --no-bitmaps, which reads every used block, for
# comparison. dd + qemu-img convert and rsync are in bench/migrate.sh.
#
#   bash bench/migrate-qemu.sh      # ROUNDS=3; writes bench/out/migrate-qemu.md
#
# WORK (default /dev/shm/sauve-migrate-qemu when it has room, else
# /var/tmp) holds the drive, the target and the state: the figures are
# the CPU and copy costs of the passes more than disk speed. The
# reference images come from ../shared/bench/make-disk.sh ($BENCH_DIR,
# default /tmp/bench; reused when present). Each pass is timed by
# /usr/bin/time (wall, user+system CPU, peak RSS).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
ROUNDS=${ROUNDS:-3}
OUT=bench/out
for t in qemu-system-x86_64 qemu-img python3 /usr/bin/time; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done
if [ ! -f "$B/day1.img" ] || [ ! -f "$B/day2.img" ]; then
  [ "$(id -u)" = 0 ] || { echo "building the reference disk needs root (../shared/bench/make-disk.sh)" >&2; exit 1; }
  bash ../shared/bench/make-disk.sh > /dev/null
fi
if [ -z "${WORK:-}" ]; then
  WORK=/var/tmp/sauve-migrate-qemu
  [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -ge 10 ] 2>/dev/null && WORK=/dev/shm/sauve-migrate-qemu
fi
mkdir -p "$WORK/bin" "$OUT"
go build -o "$WORK/bin/sauve" ./cmd/sauve
S=$WORK/bin/sauve
export XDG_CACHE_HOME=$WORK/cache
QEMU_PID=
stop_vm() { [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null; QEMU_PID=; }
trap 'stop_vm; rm -rf "$WORK"' EXIT

# The churn: the 64 KiB blocks of day2.img that differ from day1.img,
# merged into extents (offset length), computed once.
if [ ! -s "$WORK/churn" ]; then
  python3 - "$B/day1.img" "$B/day2.img" > "$WORK/churn" <<'EOF'
import sys
bs = 64 << 10
a, b = open(sys.argv[1], 'rb'), open(sys.argv[2], 'rb')
off, start = 0, None
while True:
    x, y = a.read(bs), b.read(bs)
    if not x and not y:
        break
    if x != y:
        if start is None:
            start = off
    elif start is not None:
        print(start, off - start); start = None
    off += bs
if start is not None:
    print(start, off - start)
EOF
fi
echo "churn: $(wc -l < "$WORK/churn") extents, $(awk '{n+=$2} END{print n/1048576}' "$WORK/churn") MiB"
# The drive: day 1 as a qcow2 v3, made once and copied at each round.
[ -f "$WORK/day1.qcow2" ] || qemu-img convert -O qcow2 "$B/day1.img" "$WORK/day1.qcow2"

# churn FROM: write FROM's bytes of every churn extent into the drive,
# through the VM's monitor (qemu-io), as the guest would.
churn() {
  python3 - "$WORK/mon.qmp" "$1" "$WORK/churn" "$WORK/pattern" <<'EOF'
import json, socket, sys
mon, src, extents, pat = sys.argv[1:]
s = socket.socket(socket.AF_UNIX); s.connect(mon)
f = s.makefile('rw')
def call(cmd, args=None):
    f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "error" in r:
            sys.exit("%s: %s" % (cmd, r["error"]))
        if "return" in r:
            return r["return"]
f.readline()
call("qmp_capabilities")
img = open(src, 'rb')
for line in open(extents):
    off, n = map(int, line.split())
    img.seek(off)
    with open(pat, 'wb') as p:
        p.write(img.read(n))
    out = call("human-monitor-command", {"command-line": 'qemu-io big "write -s %s %d %d"' % (pat, off, n)})
    if "error" in out.lower() or "failed" in out.lower():
        sys.exit(out)
EOF
}

declare -A samples
timed() { # timed KEY CMD... — wall, CPU and RSS of CMD; keeps its output
  local key=$1; shift
  /usr/bin/time -o "$WORK/t" -f "%e %U %S %M" "$@" > "$WORK/out" 2> "$WORK/err" || { echo "$key failed:" >&2; cat "$WORK/err" >&2; exit 1; }
  read -r w u s m < "$WORK/t"
  samples["$key"]+="$w $(awk -v u="$u" -v s="$s" 'BEGIN{print u+s}') $m $(field bytes_read) $(field bytes_written) $(field chunks_unread);"
}
field() { grep -o "\"$1\":[0-9]*" "$WORK/out" | head -1 | cut -d: -f2; }

for r in $(seq "$ROUNDS"); do
  echo "== round $r"
  stop_vm
  rm -rf "$WORK/cache" "$WORK/target.qcow2" "$WORK"/*.qmp
  cp "$WORK/day1.qcow2" "$WORK/drive.qcow2"
  qemu-system-x86_64 -M none -nodefaults -display none -name bench -uuid 5b0e3c1a-7d2f-4e8a-9c6b-1f2e3d4c5b6a \
    -qmp "unix:$WORK/vm.qmp,server=on,wait=off" -qmp "unix:$WORK/mon.qmp,server=on,wait=off" \
    -drive "if=none,id=big,file=$WORK/drive.qcow2,format=qcow2" > /dev/null &
  QEMU_PID=$!
  for _ in $(seq 100); do [ -S "$WORK/mon.qmp" ] && break; sleep 0.1; done
  timed first "$S" migrate "qemu:$WORK/vm.qmp" "$WORK/target.qcow2" --json
  churn "$B/day2.img"
  timed delta-bitmap "$S" migrate "qemu:$WORK/vm.qmp" "$WORK/target.qcow2" --json
  churn "$B/day1.img"
  timed delta-no-bitmaps "$S" migrate "qemu:$WORK/vm.qmp" "$WORK/target.qcow2" --no-bitmaps --json
  qemu-img check -q "$WORK/target.qcow2" || { echo "qemu-img check of the target failed" >&2; exit 1; }
done
stop_vm

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
col() { IFS=';' read -ra xs <<< "${samples[$1]}"; for x in "${xs[@]}"; do echo "$x" | awk -v n="$2" '{print $n}'; done | median; }
mib() { awk -v b="$1" 'BEGIN{printf "%.0f", b/1048576}'; }
{
  echo "## Migration of a running QEMU VM's drive (issue 15) ($(date +%F), $(nproc) cores)"
  echo
  echo "Command: \`ROUNDS=$ROUNDS bash bench/migrate-qemu.sh\` (sauve $(git rev-parse --short HEAD), $(qemu-system-x86_64 --version | head -1 | sed 's/ (.*//')). The reference disk's day 1 as a qcow2 drive of a VM without guest OS; day 2's churn ($(awk '{n+=$2} END{printf "%.0f", n/1048576}' "$WORK/churn") MiB in $(wc -l < "$WORK/churn") extents of 64 KiB blocks) written through qemu-io; a qcow2 target. Medians of $ROUNDS rounds."
  echo
  echo "| pass | wall s | CPU s | peak RSS MiB | read MiB | written MiB | chunks not read |"
  echo "|---|---|---|---|---|---|---|"
  for k in first delta-bitmap delta-no-bitmaps; do
    echo "| $k | $(col "$k" 1) | $(col "$k" 2) | $(( $(col "$k" 3) / 1024 )) | $(mib "$(col "$k" 4)") | $(mib "$(col "$k" 5)") | $(col "$k" 6) |"
  done
  echo
  echo "- delta with bitmap / first pass: $(awk -v a="$(col delta-bitmap 1)" -v b="$(col first 1)" 'BEGIN{printf "%.0f%%", 100*a/b}') of the wall time, $(awk -v a="$(col delta-bitmap 4)" -v b="$(col first 4)" 'BEGIN{printf "%.0f%%", 100*a/b}') of the bytes read"
  echo "- delta with --no-bitmaps / first pass: $(awk -v a="$(col delta-no-bitmaps 1)" -v b="$(col first 1)" 'BEGIN{printf "%.0f%%", 100*a/b}') of the wall time"
} | tee "$OUT/migrate-qemu.md"
