#!/usr/bin/env bash
# backup-compare.sh — issue 2's benchmark: sauve against restic, dd|gzip and
# zstd on the reference disk, in one run, on one machine.
#
#   bash bench/backup-compare.sh            # as root; writes bench/out/backup-compare.md
#   CHUNK_SIZES="64K 256K" bash bench/backup-compare.sh   # chunk-size study only for these
#   SKIP_OTHERS=1 bash bench/backup-compare.sh            # sauve only
#
# Images come from ../shared/bench/make-disk.sh (/tmp/bench/day1.img and
# day2.img, 4 GiB each, day 2 ≈ 2% churn). Every run starts with the image in
# the page cache (read once before), so the figures measure the tools, not
# this machine's disk. Repositories and outputs go to $WORK (default
# /var/tmp/sauve-bench), on the same file system for every tool.
#
# For each step: wall time, throughput (logical 4 GiB / wall), CPU time
# (user+sys), peak RSS, and repository growth.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-bench}
OUT=bench/out
CHUNK_SIZES=${CHUNK_SIZES:-"64K 128K 256K 1M"}
mkdir -p "$OUT"
REPORT=$OUT/backup-compare.md

bash ../shared/bench/make-disk.sh >/dev/null
IMG_SIZE=$(stat -c %s "$B/day1.img")
go build -o "$WORK/bin/sauve" ./cmd/sauve 2>/dev/null || { mkdir -p "$WORK/bin"; go build -o "$WORK/bin/sauve" ./cmd/sauve; }
SAUVE=$WORK/bin/sauve

warm() { cat "$@" > /dev/null; }
dsize() { du -sb "$1" 2>/dev/null | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# measure LABEL GROWTH_DIR CMD... — runs CMD under /usr/bin/time, appends a row.
measure() {
  local label=$1 dir=$2; shift 2
  local before=0 after=0 t
  [ -n "$dir" ] && before=$(dsize "$dir" || echo 0)
  sync
  if ! /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" bash -c "$*" > /dev/null 2> "$WORK/err.txt"; then
    echo "$label failed:" >&2; cat "$WORK/err.txt" >&2; exit 1
  fi
  t=$(tail -1 "$WORK/time.txt")
  [ -n "$dir" ] && after=$(dsize "$dir")
  read -r wall user sys rss <<< "$t"
  awk -v l="$label" -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss" -v g=$((after - before)) -v sz="$IMG_SIZE" \
    'BEGIN { printf "| %s | %.2f | %.0f | %.2f | %.0f | %s |\n", l, w, sz / 1048576 / w, u + s, r / 1024, (g ? sprintf("%.1f", g / 1048576) : "-") }' >> "$REPORT"
}

header() {
  { echo; echo "### $1"; echo
    echo "| step | wall s | MiB/s | CPU s | peak RSS MiB | repo growth MiB |"
    echo "|---|---|---|---|---|---|"; } >> "$REPORT"
}

{
  echo "## Backup and restore of the reference disk ($(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo
  echo "Command: \`bash bench/backup-compare.sh\`. Images: $(head -3 "$B/images.txt" | tr '\n' ' ')"
} > "$REPORT"

# same_files A B — the ext4 partitions of two disk images hold the same files
# and B's checks clean (free space differs when sauve skipped it).
same_files() {
  . "$B/disk.env"
  local la lb ma=$WORK/mnt-a mb=$WORK/mnt-b
  la=$(losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$1")
  lb=$(losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$2")
  e2fsck -fn "$lb" > /dev/null
  mkdir -p "$ma" "$mb"
  mount -o ro,noload "$la" "$ma"; mount -o ro,noload "$lb" "$mb"
  local rc=0
  diff -r "$ma" "$mb" > /dev/null || rc=1
  umount "$ma" "$mb"; losetup -d "$la" "$lb"
  return $rc
}

run_sauve() { # run_sauve CHUNK LABEL [BACKUP FLAGS]
  local cs=$1 label=$2 flags=${3:-}
  local R=$WORK/sauve-$cs
  rm -rf "$R" "$WORK/cfg" "$WORK/cache" "$WORK/restore.img"
  export XDG_CONFIG_HOME=$WORK/cfg XDG_CACHE_HOME=$WORK/cache SAUVE_REPO=$R/repo
  mkdir -p "$R"
  "$SAUVE" init --chunk-size "$cs" > /dev/null
  header "$label"
  # One disk path, day 1 then day 2, as a host's /dev/vda would be
  # ('restore latest' then means that disk).
  ln -sfn "$B/day1.img" "$WORK/disk.img"
  warm "$B/day1.img"
  measure "full backup, day 1" "$R" "$SAUVE backup $flags $WORK/disk.img"
  measure "backup day 1 again (unchanged)" "$R" "$SAUVE backup $flags $WORK/disk.img"
  ln -sfn "$B/day2.img" "$WORK/disk.img"
  warm "$B/day2.img"
  measure "backup day 2" "$R" "$SAUVE backup $flags $WORK/disk.img"
  measure "restore day 2 (new sparse file, synced)" "" "$SAUVE restore latest $WORK/restore.img"
  if [ -n "$flags" ]; then
    cmp "$B/day2.img" "$WORK/restore.img" || { echo "sauve restore differs" >&2; exit 1; }
  else
    same_files "$B/day2.img" "$WORK/restore.img" || { echo "sauve restore holds other files" >&2; exit 1; }
  fi
  rm -f "$WORK/restore.img"
  echo "| index objects | | | | | $(mib "$(dsize "$R/repo/index")") |" >> "$REPORT"
  unset XDG_CONFIG_HOME XDG_CACHE_HOME SAUVE_REPO
}

run_sauve 256K "sauve --no-fs-skip (every byte, like the other tools; 256 KiB chunks)" --no-fs-skip
run_sauve 256K "sauve, default (free space of the ext4 partition skipped; 256 KiB chunks)"

if [ "${SKIP_OTHERS:-0}" != 1 ]; then
  export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$WORK/restic-cache
  R=$WORK/restic
  rm -rf "$R" "$RESTIC_CACHE_DIR"
  restic init -r "$R" > /dev/null
  header "restic $(restic version | awk '{print $2}') (backup --stdin, restore with dump)"
  warm "$B/day1.img"
  measure "full backup, day 1" "$R" "restic -r $R backup --stdin --stdin-filename disk.img < $B/day1.img"
  measure "backup day 1 again (unchanged)" "$R" "restic -r $R backup --stdin --stdin-filename disk.img < $B/day1.img"
  warm "$B/day2.img"
  measure "backup day 2" "$R" "restic -r $R backup --stdin --stdin-filename disk.img < $B/day2.img"
  measure "restore day 2 (dump to file, synced)" "" "restic -r $R dump latest disk.img > $WORK/restore.img && sync $WORK/restore.img"
  cmp "$B/day2.img" "$WORK/restore.img"
  rm -rf "$WORK/restore.img" "$R" "$RESTIC_CACHE_DIR"

  R=$WORK/gzip
  rm -rf "$R"; mkdir -p "$R"
  header "dd | gzip (every run a full copy)"
  warm "$B/day1.img"
  measure "full backup, day 1" "$R" "dd if=$B/day1.img bs=1M status=none | gzip > $R/day1.img.gz"
  warm "$B/day2.img"
  measure "backup day 2" "$R" "dd if=$B/day2.img bs=1M status=none | gzip > $R/day2.img.gz"
  measure "restore day 2 (gunzip | dd, synced)" "" "gunzip -c $R/day2.img.gz | dd of=$WORK/restore.img bs=1M conv=fsync status=none"
  rm -rf "$R" "$WORK/restore.img"

  R=$WORK/zstd
  rm -rf "$R"; mkdir -p "$R"
  header "zstd -T0 (every run a full copy)"
  warm "$B/day1.img"
  measure "full backup, day 1" "$R" "zstd -q -T0 -c $B/day1.img > $R/day1.img.zst"
  warm "$B/day2.img"
  measure "backup day 2" "$R" "zstd -q -T0 -c $B/day2.img > $R/day2.img.zst"
  measure "restore day 2 (zstd -d, synced)" "" "zstd -q -d -c $R/day2.img.zst | dd of=$WORK/restore.img bs=1M conv=fsync status=none"
  rm -rf "$R" "$WORK/restore.img"

  header "raw dd copy (the restore reference)"
  warm "$B/day2.img"
  measure "dd if=day2.img of=copy bs=1M conv=fsync" "" "dd if=$B/day2.img of=$WORK/copy.img bs=1M conv=fsync status=none"
  rm -f "$WORK/copy.img"
fi

# Chunk-size study (every byte, --no-fs-skip, as when the map does not help):
# what the day-2 increment, the index and the full backup cost at each chunk
# size.
{ echo; echo "### sauve chunk size study"; echo
  echo "| chunk size | full backup s (--no-fs-skip) | day-1 repo MiB | day-2 growth MiB | index MiB | chunks per TiB | index in memory per TiB of unique data |"
  echo "|---|---|---|---|---|---|---|"; } >> "$REPORT"
for cs in $CHUNK_SIZES; do
  R=$WORK/study-$cs
  rm -rf "$R" "$WORK/cfg" "$WORK/cache"
  export XDG_CONFIG_HOME=$WORK/cfg XDG_CACHE_HOME=$WORK/cache SAUVE_REPO=$R
  "$SAUVE" init --chunk-size "$cs" > /dev/null
  warm "$B/day1.img"
  /usr/bin/time -o "$WORK/time.txt" -f "%e" "$SAUVE" backup --no-fs-skip "$B/day1.img" > /dev/null
  s=$(tail -1 "$WORK/time.txt")
  d1=$(dsize "$R")
  "$SAUVE" backup --no-fs-skip "$B/day2.img" > /dev/null
  d2=$(dsize "$R")
  idx=$(dsize "$R/index")
  bytes=$("$SAUVE" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["disks"][0]["chunk_size"])')
  awk -v cs="$cs" -v s="$s" -v d1="$d1" -v g=$((d2 - d1)) -v idx="$idx" -v b="$bytes" \
    'BEGIN { n = 2^40 / b; printf "| %s | %.2f | %.1f | %.1f | %.2f | %.1f M | %.0f MiB (49 B per chunk) |\n", cs, s, d1 / 1048576, g / 1048576, idx / 1048576, n / 1e6, n * 49 / 1048576 }' >> "$REPORT"
  rm -rf "$R"
  unset XDG_CONFIG_HOME XDG_CACHE_HOME SAUVE_REPO
done
cat "$REPORT"
