#!/usr/bin/env bash
# fsskip.sh — free-space skipping on the reference disk, side by side with
# the tools users would pick instead. One command, as root:
#
#   bash bench/fsskip.sh            # uses $BENCH_DIR/day1.img (default /tmp/bench), built by ../shared/bench/make-disk.sh
#
# Runs, each on a cold page cache (DROP_CACHES=0 to skip dropping it):
#   sauve backup (free space skipped)      into a fresh local repository
#   sauve backup --no-fs-skip              into a fresh local repository
#   partclone.ext4 -c | zstd -T0           of the ext4 partition (a read-only loop device)
#   dd bs=1M | gzip                        of the whole disk
# and prints wall time, peak memory, bytes the process read from storage
# (/proc/PID/io read_bytes, readahead included), bytes sauve asked for, and
# the output size. The target: sauve with skipping reads at most the used
# bytes + 1% and is faster than partclone + zstd.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
IMG=${IMG:-$B/day1.img}
DROP=${DROP_CACHES:-1}
[ "$(id -u)" = 0 ] || { echo "must run as root (loop devices, drop_caches)" >&2; exit 1; }
[ -f "$IMG" ] || { echo "missing $IMG: run bash ../shared/bench/make-disk.sh" >&2; exit 1; }
for t in partclone.ext4 zstd gzip dumpe2fs losetup jq /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
. "$B/disk.env"

W=$(mktemp -d /tmp/sauve-fsskip.XXXXXX)
LOOP=
cleanup() { [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
go build -o "$W/sauve" ./cmd/sauve

export SAUVE_PASSPHRASE= XDG_CONFIG_HOME=$W/config XDG_CACHE_HOME=$W/cache
drop() { sync; [ "$DROP" = 1 ] && echo 3 > /proc/sys/vm/drop_caches || true; }

# run NAME CMD...: times CMD under /usr/bin/time in a shell that reports
# its own /proc io counters (children's included once reaped).
declare -A SECS MEM IO
run() {
  local name=$1; shift
  drop
  /usr/bin/time -f "%e %M" -o "$W/time" bash -c '"$@"; grep -E "^read_bytes" /proc/$$/io > '"$W/io" _ "$@"
  read -r SECS[$name] MEM[$name] < "$W/time"
  IO[$name]=$(awk '{print $2}' "$W/io")
}

LOOP=$(losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$IMG")
USED=$(dumpe2fs -h "$LOOP" 2>/dev/null | awk -F: '/^Block count/ {c=$2} /^Free blocks/ {f=$2} /^Block size/ {b=$2} END {printf "%d", (c-f)*b}')

for mode in skip noskip; do
  repo=$W/repo-$mode
  "$W/sauve" --repo "$repo" init >/dev/null 2>&1
  flag=; [ $mode = noskip ] && flag=--no-fs-skip
  run "sauve-$mode" sh -c "'$W/sauve' --repo '$repo' backup '$IMG' $flag --json --progress never > '$W/$mode.json'"
done
run partclone sh -c "partclone.ext4 -c -q -s '$LOOP' -o - 2>'$W/pc.log' | zstd -T0 -q > '$W/pc.zst'"
run ddgzip sh -c "dd if='$IMG' bs=1M status=none | gzip > '$W/dd.gz'"

ASKED=$(jq .bytes_read "$W/skip.json")
ASKED_NO=$(jq .bytes_read "$W/noskip.json")
PUSED=$(jq '.partitions[0].used_bytes' "$W/skip.json")
OUT_SKIP=$(du -sb "$W/repo-skip" | cut -f1)
OUT_NO=$(du -sb "$W/repo-noskip" | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.0f", b / 1048576}'; }

echo
echo "reference disk: $IMG ($(mib $IMG_SIZE) MiB), ext4 used $(mib "$USED") MiB (dumpe2fs); sauve counts $(mib "$PUSED") MiB used"
echo
echo "| tool | time (s) | peak RSS (MiB) | read from storage (MiB) | bytes asked for (MiB) | output (MiB) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
printf "| sauve backup (free space skipped) | %s | %s | %s | %s | %s |\n" "${SECS[sauve-skip]}" "$(mib $((MEM[sauve-skip] * 1024)))" "$(mib "${IO[sauve-skip]}")" "$(mib "$ASKED")" "$(mib "$OUT_SKIP")"
printf "| sauve backup --no-fs-skip | %s | %s | %s | %s | %s |\n" "${SECS[sauve-noskip]}" "$(mib $((MEM[sauve-noskip] * 1024)))" "$(mib "${IO[sauve-noskip]}")" "$(mib "$ASKED_NO")" "$(mib "$OUT_NO")"
printf "| partclone.ext4 -c \\| zstd -T0 | %s | %s | %s | | %s |\n" "${SECS[partclone]}" "$(mib $((MEM[partclone] * 1024)))" "$(mib "${IO[partclone]}")" "$(mib "$(stat -c %s "$W/pc.zst")")"
printf "| dd bs=1M \\| gzip | %s | %s | %s | | %s |\n" "${SECS[ddgzip]}" "$(mib $((MEM[ddgzip] * 1024)))" "$(mib "${IO[ddgzip]}")" "$(mib "$(stat -c %s "$W/dd.gz")")"
echo
LIMIT=$(( (USED + 1048576) * 101 / 100 ))
if [ "$ASKED" -le "$LIMIT" ]; then v=met; else v=MISSED; fi
echo "target read <= used + 1%: sauve asked for $(mib "$ASKED") MiB, limit $(mib "$LIMIT") MiB (used + the 1 MiB before the partition): $v"
if awk -v a="${SECS[sauve-skip]}" -v b="${SECS[partclone]}" 'BEGIN {exit !(a < b)}'; then v=met; else v=MISSED; fi
echo "target faster than partclone + zstd: ${SECS[sauve-skip]} s vs ${SECS[partclone]} s: $v"
