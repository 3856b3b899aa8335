#!/usr/bin/env bash
# peers.sh — issue 16's benchmark: sauve against restic, partclone.ext4 |
# zstd -3 and zstd -T0 -3 on the reference disk, day 1 and day 2, in one
# sitting, repetitions interleaved, medians.
#
#   bash bench/peers.sh                      # as root; writes bench/out/peers.md
#   ROUNDS=5 bash bench/peers.sh
#   OLD=/path/to/old/sauve bash bench/peers.sh   # adds the old binary's rows
#
# sauve runs three ways: its default, --no-fs-skip (every byte, as restic
# and zstd store them) and --compression max (the smallest it stores).
#
# Images come from ../shared/bench/make-disk.sh (/tmp/bench/day1.img and
# day2.img, 4 GiB each, ext4 in a partition at 1 MiB; day 2 about 2% churn
# and files deleted). Each round runs every tool once, in turn, so that the
# machine's noise falls on all of them: a full backup of day 1 into a new
# repository (or output), a backup of day 2 into the same one, a restore of
# day 2 into a new file. Every step runs under /usr/bin/time with its image
# in the page cache: wall, CPU (user+sys, children included), peak RSS;
# growth is `du -sb` of the repository before and after (for the tools
# without a repository, the size of the output). The first round checks
# every restore: byte-exact (cmp) where the tool keeps every byte; e2fsck
# and a diff of the mounted files where free space is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-peers}
ROUNDS=${ROUNDS:-3}
OLD=${OLD:-}
OUT=bench/out
REPORT=$OUT/peers.md
mkdir -p "$OUT" "$WORK/bin"
for t in restic partclone.ext4 zstd e2fsck losetup /usr/bin/time; do
  command -v "$t" > /dev/null || { echo "peers.sh needs $t" >&2; exit 1; }
done
bash ../shared/bench/make-disk.sh > /dev/null
. "$B/disk.env"
go build -o "$WORK/bin/sauve" ./cmd/sauve
NEW=$WORK/bin/sauve

LOOPS=()
cleanup() { for l in "${LOOPS[@]}"; do losetup -d "$l" 2> /dev/null || true; done; }
trap cleanup EXIT
part() { # part IMG: a read-only loop device of the image's ext4 partition
  losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$1"
}
P1=$(part "$B/day1.img")
LOOPS+=("$P1")
P2=$(part "$B/day2.img")
LOOPS+=("$P2")

dsize() { du -sb "$1" 2> /dev/null | cut -f1; }
warm() { cat "$@" > /dev/null; }
declare -A samples
# measure KEY GROWTH_PATH CMD — runs CMD (a shell command) under
# /usr/bin/time and keeps wall, CPU, peak RSS and the growth of GROWTH_PATH.
measure() {
  local key=$1 dir=$2 before=0 after=0
  shift 2
  [ -n "$dir" ] && before=$(dsize "$dir" || echo 0)
  sync
  if ! /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" bash -c "$*" > /dev/null 2> "$WORK/err.txt"; then
    echo "$key failed:" >&2
    cat "$WORK/err.txt" >&2
    exit 1
  fi
  [ -n "$dir" ] && after=$(dsize "$dir")
  read -r wall user sys rss < <(tail -1 "$WORK/time.txt")
  samples["$key"]+="$wall $(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }') $rss $((after - before));"
}

# same_files A B — the ext4 partitions of two disk images hold the same
# files and B's checks clean (free space differs when sauve skipped it).
same_files() {
  local la lb ma=$WORK/mnt-a mb=$WORK/mnt-b rc=0
  la=$(part "$1")
  lb=$(part "$2")
  e2fsck -fn "$lb" > /dev/null || rc=1
  mkdir -p "$ma" "$mb"
  mount -o ro,noload "$la" "$ma"
  mount -o ro,noload "$lb" "$mb"
  diff -r "$ma" "$mb" > /dev/null || rc=1
  umount "$ma" "$mb"
  losetup -d "$la" "$lb"
  return $rc
}

run_sauve() { # run_sauve ROUND LABEL BIN [FLAGS]
  local round=$1 label=$2 bin=$3 flags=${4:-} R=$WORK/sauve
  rm -rf "$R" "$WORK/cfg" "$WORK/cache" "$WORK/restore.img"
  export XDG_CONFIG_HOME=$WORK/cfg XDG_CACHE_HOME=$WORK/cache SAUVE_REPO=$R
  "$bin" init > /dev/null
  # One disk path, day 1 then day 2, as a host's /dev/vda would be.
  ln -sfn "$B/day1.img" "$WORK/disk.img"
  warm "$B/day1.img"
  measure "$label|full backup, day 1" "$R" "$bin backup $flags $WORK/disk.img"
  ln -sfn "$B/day2.img" "$WORK/disk.img"
  warm "$B/day2.img"
  measure "$label|backup day 2" "$R" "$bin backup $flags $WORK/disk.img"
  measure "$label|restore day 2" "" "$bin restore latest $WORK/restore.img"
  if [ "$round" = 1 ]; then
    if [ "$flags" = --no-fs-skip ]; then
      cmp "$B/day2.img" "$WORK/restore.img" || { echo "$label: restore differs from day 2" >&2; exit 1; }
    else
      same_files "$B/day2.img" "$WORK/restore.img" || { echo "$label: restore holds other files" >&2; exit 1; }
    fi
  fi
  rm -rf "$R" "$WORK/cfg" "$WORK/cache" "$WORK/restore.img"
  unset XDG_CONFIG_HOME XDG_CACHE_HOME SAUVE_REPO
}

run_restic() { # run_restic ROUND
  local round=$1 R=$WORK/restic label="restic $(restic version | awk '{print $2}')"
  export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$WORK/restic-cache
  rm -rf "$R" "$RESTIC_CACHE_DIR" "$WORK/restore.img"
  restic init -r "$R" > /dev/null
  warm "$B/day1.img"
  measure "$label|full backup, day 1" "$R" "restic -r $R backup --stdin --stdin-filename disk.img < $B/day1.img"
  warm "$B/day2.img"
  measure "$label|backup day 2" "$R" "restic -r $R backup --stdin --stdin-filename disk.img < $B/day2.img"
  measure "$label|restore day 2" "" "restic -r $R dump latest disk.img > $WORK/restore.img && sync $WORK/restore.img"
  if [ "$round" = 1 ]; then cmp "$B/day2.img" "$WORK/restore.img"; fi
  rm -rf "$R" "$RESTIC_CACHE_DIR" "$WORK/restore.img"
  unset RESTIC_PASSWORD RESTIC_CACHE_DIR
}

run_partclone() { # run_partclone ROUND — every backup a full copy of the partition's used blocks
  local round=$1 R=$WORK/partclone label="partclone.ext4 | zstd -3"
  rm -rf "$R" "$WORK/restore.part"
  mkdir -p "$R"
  warm "$B/day1.img"
  measure "$label|full backup, day 1" "$R" "partclone.ext4 -c -q -s $P1 -o - 2> /dev/null | zstd -q -3 -T0 > $R/day1.pc.zst"
  warm "$B/day2.img"
  measure "$label|backup day 2" "$R" "partclone.ext4 -c -q -s $P2 -o - 2> /dev/null | zstd -q -3 -T0 > $R/day2.pc.zst"
  # partclone restores onto a target of the partition's size at least.
  truncate -s "$PART_SIZE" "$WORK/restore.part"
  measure "$label|restore day 2" "" "zstd -q -d -c $R/day2.pc.zst | partclone.ext4 -r -q -s - -O $WORK/restore.part 2> /dev/null && sync $WORK/restore.part"
  if [ "$round" = 1 ]; then e2fsck -fn "$WORK/restore.part" > /dev/null; fi
  rm -rf "$R" "$WORK/restore.part"
}

run_zstd() { # run_zstd ROUND — every backup a full copy of the disk
  local round=$1 R=$WORK/zstd label="zstd -T0 -3"
  rm -rf "$R" "$WORK/restore.img"
  mkdir -p "$R"
  warm "$B/day1.img"
  measure "$label|full backup, day 1" "$R" "zstd -q -3 -T0 -c $B/day1.img > $R/day1.img.zst"
  warm "$B/day2.img"
  measure "$label|backup day 2" "$R" "zstd -q -3 -T0 -c $B/day2.img > $R/day2.img.zst"
  measure "$label|restore day 2" "" "zstd -q -d -c $R/day2.img.zst | dd of=$WORK/restore.img bs=1M conv=fsync status=none"
  if [ "$round" = 1 ]; then cmp "$B/day2.img" "$WORK/restore.img"; fi
  rm -rf "$R" "$WORK/restore.img"
}

tools=("sauve" "sauve --no-fs-skip" "sauve --compression max")
runs=('run_sauve $r "sauve" "$NEW"' 'run_sauve $r "sauve --no-fs-skip" "$NEW" --no-fs-skip'
  'run_sauve $r "sauve --compression max" "$NEW" "--compression max"')
if [ -n "$OLD" ]; then
  tools+=("sauve (old)" "sauve (old) --no-fs-skip")
  runs+=('run_sauve $r "sauve (old)" "$OLD"' 'run_sauve $r "sauve (old) --no-fs-skip" "$OLD" --no-fs-skip')
fi
tools+=("restic $(restic version | awk '{print $2}')" "partclone.ext4 | zstd -3" "zstd -T0 -3")
runs+=('run_restic $r' 'run_partclone $r' 'run_zstd $r')
# Each round starts one tool further down the list, so that no tool always
# runs first (after the previous round's deletions) or after the same one.
for r in $(seq "$ROUNDS"); do
  n=${#runs[@]}
  for i in $(seq 0 $((n - 1))); do
    eval "${runs[$(((i + r - 1) % n))]}"
  done
done

median() { tr ';' '\n' | grep -v '^$' | awk -v f="$1" '{print $f}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
each() { tr ';' '\n' | grep -v '^$' | awk '{print $1}' | paste -sd' '; }
steps=("full backup, day 1" "backup day 2" "restore day 2")
{
  echo "## Peers on the reference disk ($(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo
  echo "Command: \`ROUNDS=$ROUNDS${OLD:+ OLD=$OLD} bash bench/peers.sh\` (interleaved, medians; work in $WORK). Images: $(head -5 "$B/images.txt" | tr '\n' ' ')"
  echo
  echo "| tool | step | wall s (median) | wall s, each round | CPU s | peak RSS MiB | growth MiB |"
  echo "|---|---|---|---|---|---|---|"
  for tool in "${tools[@]}"; do
    for step in "${steps[@]}"; do
      s=${samples["$tool|$step"]:-}
      [ -z "$s" ] && continue
      g=$(echo "$s" | median 4 | awk '{ if ($1 == 0) print "-"; else printf "%.1f", $1 / 1048576 }')
      printf '| %s | %s | %s | %s | %s | %.0f | %s |\n' "${tool//|/\\|}" "$step" "$(echo "$s" | median 1)" "$(echo "$s" | each)" \
        "$(echo "$s" | median 2)" "$(echo "$s" | median 3 | awk '{print $1 / 1024}')" "$g"
    done
  done
  echo
  rw=$(echo "${samples["${tools[-3]}|full backup, day 1"]}" | median 1)
  for tool in "sauve" "sauve --no-fs-skip" "sauve --compression max"; do
    sw=$(echo "${samples["$tool|full backup, day 1"]}" | median 1)
    awk -v t="$tool" -v s="$sw" -v r="$rw" 'BEGIN { printf "- %s full backup: %.2f s against restic %.2f s: %.1fx\n", t, s, r, r / s }'
  done
} > "$REPORT"
cat "$REPORT"
