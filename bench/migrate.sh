#!/usr/bin/env bash
# migrate.sh — issue 15's benchmark: a first pass and a delta pass of
# 'sauve migrate' on the reference disk (day 1, then day 2's churn
# written over it), against what a user scripts today: dd of the whole
# disk at every pass, and rsync -aHAX --inplace of the mounted
# filesystem for the delta. And the cut-over: --final with the source's
# filesystem mounted, frozen for the last delta.
#
#   bash bench/migrate.sh          # as root; ROUNDS=3; writes bench/out/migrate.md
#
# WORK (default /var/tmp/sauve-migrate) holds the source, the targets and
# the state; the reference images come from ../shared/bench/make-disk.sh
# ($BENCH_DIR, default /tmp/bench). All in the page cache as far as it
# holds: the figures are CPU and copy costs more than disk speed. Each
# step is timed by /usr/bin/time (wall, user+system CPU, peak RSS).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-migrate}
ROUNDS=${ROUNDS:-3}
OUT=bench/out
[ "$(id -u)" = 0 ] || { echo "must run as root (loop mounts, fsfreeze)" >&2; exit 1; }
for t in rsync /usr/bin/time mount fsfreeze; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done
bash ../shared/bench/make-disk.sh > /dev/null
# shellcheck disable=SC1091
source "$B/disk.env"
mkdir -p "$WORK/bin" "$WORK/a" "$WORK/b" "$OUT"
go build -o "$WORK/bin/sauve" ./cmd/sauve
S=$WORK/bin/sauve
export XDG_CACHE_HOME=$WORK/cache
declare -A samples
timed() { # timed KEY CMD... — wall, CPU and RSS of CMD
  local key=$1; shift
  sync
  /usr/bin/time -o "$WORK/t" -f "%e %U %S %M" "$@" > "$WORK/out" 2> "$WORK/err" || { echo "$key failed:" >&2; cat "$WORK/err" >&2; exit 1; }
  read -r w u s m < "$WORK/t"
  samples["$key"]+="$w $(awk -v u="$u" -v s="$s" 'BEGIN{print u+s}') $m;"
}
json_field() { grep -o "\"$1\":[0-9]*" "$WORK/out" | head -1 | cut -d: -f2; }
umount_all() { umount "$WORK/a" 2>/dev/null || true; umount "$WORK/b" 2>/dev/null || true; }
trap umount_all EXIT

for r in $(seq "$ROUNDS"); do
  echo "== round $r"
  rm -rf "$WORK/cache" "$WORK"/*.img
  cp --sparse=always "$B/day1.img" "$WORK/src.img"
  # sauve: first pass, then day 2 written over the same source file.
  timed sauve-first "$S" migrate "$WORK/src.img" "$WORK/sauve.img" --json
  first_w=$(json_field bytes_written)
  cp --sparse=always "$B/day2.img" "$WORK/src.img" # same file (inode), day 2's bytes
  timed sauve-delta "$S" migrate "$WORK/src.img" "$WORK/sauve.img" --json
  delta_w=$(json_field bytes_written)
  samples[written]+="$first_w $delta_w;"
  # dd: the whole disk at every pass (the first into a new sparse file,
# the next over it, zeros included: conv=sparse would leave old bytes).
  cp --sparse=always "$B/day1.img" "$WORK/src1.img"
  timed dd-first dd if="$WORK/src1.img" of="$WORK/dd.img" bs=4M conv=sparse status=none
  timed dd-delta dd if="$WORK/src.img" of="$WORK/dd.img" bs=4M conv=notrunc status=none
  # rsync: the day-1 copy's filesystem brought to day 2 file by file.
  cp --sparse=always "$B/day1.img" "$WORK/rsync.img"
  mount -o ro,loop,offset="$PART_OFFSET" "$WORK/src.img" "$WORK/a"
  mount -o loop,offset="$PART_OFFSET" "$WORK/rsync.img" "$WORK/b"
  timed rsync-delta rsync -aHAX --inplace --delete "$WORK/a/" "$WORK/b/"
  umount_all
  # Cut-over: the source mounted read-write (a running machine's disk),
  # a delta pass, then --final freezes it for the last one.
  mount -o loop,offset="$PART_OFFSET" "$WORK/src.img" "$WORK/a"
  dd if=/dev/urandom of="$WORK/a/cutover.bin" bs=1M count=16 status=none
  "$S" migrate "$WORK/src.img" "$WORK/sauve.img" > /dev/null
  dd if=/dev/urandom of="$WORK/a/cutover2.bin" bs=1M count=16 status=none
  timed sauve-final "$S" migrate "$WORK/src.img" "$WORK/sauve.img" --final --json
  frozen=$(grep -o '"frozen_seconds":[0-9.]*' "$WORK/out" | head -1 | cut -d: -f2)
  samples[frozen]+="${frozen:-?};"
  umount_all
  rm -f "$WORK/src1.img"
done

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
col() { IFS=';' read -ra xs <<< "${samples[$1]}"; for x in "${xs[@]}"; do echo "$x" | awk -v n="$2" '{print $n}'; done | median; }
{
  echo "## Migration passes on the reference disk (issue 15) ($(date +%F), $(nproc) cores)"
  echo
  echo "Command: \`ROUNDS=$ROUNDS bash bench/migrate.sh\` (sauve $(git rev-parse --short HEAD), $(rsync --version | head -1)). Medians of $ROUNDS rounds."
  echo
  echo "| step | wall s | CPU s | peak RSS MiB |"
  echo "|---|---|---|---|"
  for k in sauve-first sauve-delta dd-first dd-delta rsync-delta sauve-final; do
    echo "| $k | $(col "$k" 1) | $(col "$k" 2) | $(( $(col "$k" 3) / 1024 )) |"
  done
  echo
  echo "- sauve bytes written: first pass $(( $(col written 1) >> 20 )) MiB, delta pass $(( $(col written 2) >> 20 )) MiB"
  echo "- --final: writes frozen for $(col frozen 1) s (median)"
} | tee "$OUT/migrate.md"
