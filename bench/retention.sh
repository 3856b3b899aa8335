#!/usr/bin/env bash
# retention.sh — issue 13's retention benchmark: 30 daily backups of the
# reference disk at about 2% churn a day, into a sauve and a restic
# repository, then `sauve forget --keep-last 7` + `sauve prune` against
# `restic forget --keep-last 7 --prune`.
#
#   bash bench/retention.sh                  # as root; writes bench/out/retention.md (about 15 minutes on a quiet machine; ~20 GB under WORK)
#   QUICK=1 bash bench/retention.sh          # smoke run: DAYS=4, KEEP=2, ROUNDS=1
#   STEPS=prune bash bench/retention.sh      # only the forget/prune rounds, on the repositories of the last run
#
# Environment: DAYS (30), KEEP (7), CHURN (2, percent of the disk a day, as
# make-disk.sh's day 2), ROUNDS (3), BENCH_DIR (/tmp/bench: day1.img),
# WORK (/var/tmp/sauve-retention: the working image, repositories, copies),
# STEPS ("days prune").
#
# days: day 1 is $BENCH_DIR/day1.img (from ../shared/bench/make-disk.sh);
# day N+1 is made from day N in place, in one working image: the ext4
# partition is loop-mounted and bench/retention.py churn applies
# make-disk.sh's day-2 method with the seed of day N+1. Each day, right
# after it is built (image in the page cache, read once before each tool),
# `sauve backup IMAGE` and `restic backup IMAGE` (same path every day, so
# one group for both tools' keep rules; default settings: sauve skips the
# partition's free space, restic reads every byte), order alternating by
# day; repository growth is du -sb. Then both repositories and their
# local caches are set aside as they are after day DAYS.
#
# prune: ROUNDS rounds; each round runs four variants, in an order that
# rotates, each on a fresh cp -a copy of the set-aside repository and cache:
#   sauve   forget --keep-last KEEP, then prune --json (each timed)
#   sauve1  forget --keep-last KEEP --prune (one command)
#   restic  forget --keep-last KEEP --prune (one command)
#   restic2 forget --keep-last KEEP, then prune (each timed)
# Each step runs under /usr/bin/time (wall, user+sys CPU, peak RSS) inside
# bench/retention.py io, which reports the process's /proc/PID/io counters:
# rchar/wchar (bytes through read/write calls, page cache or not) and
# read_bytes/write_bytes (bytes the block layer read / that were dirtied
# for writeback). The report gives medians over the rounds. In the last
# round every variant's result is checked: sauve check --read-data and
# sauve restore latest compared with the day-DAYS image (byte-exact except
# free blocks of the partition, which sauve's default backup skips and
# restores as zeros: bench/retention.py cmpimg), restic check and restic
# dump latest compared with cmp.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${QUICK:-0}" = 1 ]; then DAYS=${DAYS:-4} KEEP=${KEEP:-2} ROUNDS=${ROUNDS:-1}; fi
DAYS=${DAYS:-30}
KEEP=${KEEP:-7}
CHURN=${CHURN:-2}
ROUNDS=${ROUNDS:-3}
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-retention}
STEPS=${STEPS:-"days prune"}
OUT=bench/out
REPORT=$OUT/retention.md
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
HELPER=$PWD/bench/retention.py

[ "$(id -u)" = 0 ] || { echo "must run as root (loop devices, mount)" >&2; exit 1; }
for t in restic losetup mount e2fsck dumpe2fs /usr/bin/time "$PY"; do
  command -v "$t" > /dev/null || { echo "missing tool: $t" >&2; exit 1; }
done
mkdir -p "$OUT" "$WORK/bin"
[ -f "$B/day1.img" ] || bash ../shared/bench/make-disk.sh > /dev/null
. "$B/disk.env"
go build -o "$WORK/bin/sauve" ./cmd/sauve
SAUVE=$WORK/bin/sauve
IMG=$WORK/disk.img            # the working image: day N after step N
SET=$WORK/set                 # repositories and caches after the last day
RUN=$WORK/run                 # the copy a prune round works on
export RESTIC_PASSWORD=bench XDG_CONFIG_HOME=$WORK/cfg SAUVE_PASSPHRASE=
dsize() { du -sb "$1" 2> /dev/null | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
log() { echo "== $(date -u +%T) $*" >&2; }

MNT=$WORK/mnt
LOOP=
cleanup() {
  set +e
  mountpoint -q "$MNT" && umount "$MNT"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  LOOP=
}
trap cleanup EXIT

# use SET|RUN — point both tools at the repositories and caches of SET or RUN.
use() {
  local d=$1
  export SAUVE_REPO=$d/sauve XDG_CACHE_HOME=$d/sauve-cache RESTIC_REPOSITORY=$d/restic RESTIC_CACHE_DIR=$d/restic-cache
}

# measure NAME CMD... — runs CMD; leaves "wall cpu rss_kib" in $WORK/m/NAME.time,
# its io counters in NAME.io, its stdout in NAME.out.
measure() {
  local name=$1; shift
  mkdir -p "$WORK/m"
  sync
  if ! "$PY" "$HELPER" io "$WORK/m/$name.io" /usr/bin/time -o "$WORK/m/$name.t" -f "%e %U %S %M" "$@" \
      > "$WORK/m/$name.out" 2> "$WORK/m/$name.err"; then
    echo "$name failed: $*" >&2; cat "$WORK/m/$name.err" >&2; exit 1
  fi
  tail -1 "$WORK/m/$name.t" | awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }' > "$WORK/m/$name.time"
}

# build_day N — make day N of the working image (day 1: a sparse copy of day1.img).
build_day() {
  local n=$1
  if [ "$n" = 1 ]; then
    cp --sparse=always "$B/day1.img" "$IMG"
    return
  fi
  mkdir -p "$MNT"
  LOOP=$(losetup -f --show -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$IMG")
  mount "$LOOP" "$MNT"
  "$PY" "$HELPER" churn "$MNT" "$n" "$CHURN" "$B" "$WORK/pool.list" >> "$WORK/churn.log"
  sync -f "$MNT"
  umount "$MNT"
  e2fsck -fn "$LOOP" > "$WORK/e2fsck.txt" 2>&1 || { echo "e2fsck of day $n failed" >&2; cat "$WORK/e2fsck.txt" >&2; exit 1; }
  losetup -d "$LOOP"; LOOP=
}

fs_used() { # fs_used IMG — MiB the ext4 partition uses
  local l
  l=$(losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$1")
  dumpe2fs -h "$l" 2> /dev/null | awk -F: '/^Block count|^Free blocks|^Block size/ {gsub(/ /,"",$2); v[$1]=$2} END {printf "%.0f", (v["Block count"]-v["Free blocks"])*v["Block size"]/1048576}'
  losetup -d "$l"
}

backup_sauve() {
  cat "$IMG" > /dev/null
  measure "day$1-sauve" "$SAUVE" backup "$IMG"
}
backup_restic() {
  cat "$IMG" > /dev/null
  measure "day$1-restic" restic backup "$IMG"
}

if [[ " $STEPS " == *" days "* ]]; then
  log "days: DAYS=$DAYS CHURN=$CHURN in $WORK"
  rm -rf "$SET" "$RUN" "$WORK/cfg" "$WORK/m" "$WORK/churn.log" "$IMG"
  mkdir -p "$SET"
  use "$SET"
  "$SAUVE" init > /dev/null
  restic init > /dev/null
  printf 'day\tfs_used_mib\tsauve_bytes\trestic_bytes\tsauve_wall\tsauve_cpu\tsauve_rss\trestic_wall\trestic_cpu\trestic_rss\n' > "$WORK/days.tsv"
  for n in $(seq "$DAYS"); do
    log "day $n: build"
    build_day "$n"
    if [ $((n % 2)) = 1 ]; then backup_sauve "$n"; backup_restic "$n"; else backup_restic "$n"; backup_sauve "$n"; fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$(fs_used "$IMG")" "$(dsize "$SAUVE_REPO")" "$(dsize "$RESTIC_REPOSITORY")" \
      "$(tr ' ' '\t' < "$WORK/m/day$n-sauve.time")" "$(tr ' ' '\t' < "$WORK/m/day$n-restic.time")" >> "$WORK/days.tsv"
    tail -1 "$WORK/days.tsv" >&2
  done
  echo "$DAYS" > "$WORK/days.done"
fi

[[ " $STEPS " == *" prune "* ]] || exit 0
[ "$(cat "$WORK/days.done" 2> /dev/null)" = "$DAYS" ] || { echo "no repositories of $DAYS days in $SET: run STEPS=days first" >&2; exit 1; }

declare -A samples # samples[KEY]="wall cpu rss rchar wchar read_bytes write_bytes size_after;..."
io_of() { awk -v k="$2" '$1 == k { print $2 }' "$WORK/m/$1.io"; }
record() { # record KEY NAME [SIZE_DIR]
  local s=-
  [ -n "${3:-}" ] && s=$(dsize "$3")
  samples["$1"]+="$(cat "$WORK/m/$2.time") $(io_of "$2" rchar) $(io_of "$2" wchar) $(io_of "$2" read_bytes) $(io_of "$2" write_bytes) $s;"
}
fresh() { # fresh TOOL — $RUN gets a copy of SET's repository and cache of TOOL
  rm -rf "$RUN"
  mkdir -p "$RUN"
  cp -a "$SET/$1" "$SET/$1-cache" "$RUN/"
  use "$RUN"
  sync
}
prune_json() { # prune_json NAME — bytes_read, bytes_written and after.bytes of sauve prune --json
  "$PY" -c 'import json, sys
j = json.load(open(sys.argv[1]))
print(j["bytes_read"], j["bytes_written"], j["after"]["bytes"])' "$WORK/m/$1.out"
}
verify_sauve() {
  "$SAUVE" check --read-data > "$WORK/check-$1.txt" 2>&1 || { echo "sauve check --read-data failed ($1)" >&2; cat "$WORK/check-$1.txt" >&2; exit 1; }
  SNAPS[$1]=$("$SAUVE" snapshots --json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))')
  rm -f "$WORK/restore.img"
  "$SAUVE" restore latest "$WORK/restore.img" > /dev/null
  local l
  l=$(losetup -f --show -r -o "$PART_OFFSET" --sizelimit "$PART_SIZE" "$IMG")
  { echo "$PART_OFFSET $(dumpe2fs -h "$l" 2> /dev/null | awk -F: '/^Block size/ {gsub(/ /,"",$2); print $2}')"
    dumpe2fs "$l" 2> /dev/null | sed -n 's/^  Free blocks: //p'; } > "$WORK/free.txt"
  losetup -d "$l"
  CMP[$1]=$("$PY" "$HELPER" cmpimg "$WORK/restore.img" "$IMG" "$WORK/free.txt") || { echo "sauve restore differs ($1): ${CMP[$1]}" >&2; exit 1; }
  rm -f "$WORK/restore.img"
}
verify_restic() {
  restic check > "$WORK/check-$1.txt" 2>&1 || { echo "restic check failed ($1)" >&2; cat "$WORK/check-$1.txt" >&2; exit 1; }
  SNAPS[$1]=$(restic snapshots --json | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))')
  restic dump latest "$IMG" > "$WORK/restore.img"
  cmp "$WORK/restore.img" "$IMG" > /dev/null || { echo "restic dump differs ($1)" >&2; exit 1; }
  CMP[$1]="dump latest identical (cmp)"
  rm -f "$WORK/restore.img"
}
declare -A SNAPS CMP
# Each variant: a fresh copy, the timed steps; in the last round, the checks.
variant_sauve() {
  fresh sauve
  measure "r$1-sauve-forget" "$SAUVE" forget --keep-last "$KEEP"
  record "sauve forget" "r$1-sauve-forget"
  measure "r$1-sauve-prune" "$SAUVE" prune --json
  record "sauve prune" "r$1-sauve-prune" "$SAUVE_REPO"
  samples["sauve prune json"]+="$(prune_json "r$1-sauve-prune");"
  [ "$1" != "$ROUNDS" ] || verify_sauve sauve
}
variant_sauve1() {
  fresh sauve
  measure "r$1-sauve-forget-prune" "$SAUVE" forget --keep-last "$KEEP" --prune
  record "sauve forget --prune" "r$1-sauve-forget-prune" "$SAUVE_REPO"
  [ "$1" != "$ROUNDS" ] || verify_sauve sauve1
}
variant_restic() {
  fresh restic
  measure "r$1-restic-forget-prune" restic forget --keep-last "$KEEP" --prune
  record "restic forget --prune" "r$1-restic-forget-prune" "$RESTIC_REPOSITORY"
  [ "$1" != "$ROUNDS" ] || verify_restic restic
}
variant_restic2() {
  fresh restic
  measure "r$1-restic-forget" restic forget --keep-last "$KEEP"
  record "restic forget" "r$1-restic-forget"
  measure "r$1-restic-prune" restic prune
  record "restic prune" "r$1-restic-prune" "$RESTIC_REPOSITORY"
  [ "$1" != "$ROUNDS" ] || verify_restic restic2
}
order=(sauve restic sauve1 restic2)
for r in $(seq "$ROUNDS"); do
  for i in 0 1 2 3; do
    t=${order[$(((i + r - 1) % 4))]}
    log "round $r: $t"
    "variant_$t" "$r"
  done
done
rm -rf "$RUN"

median() { tr ';' '\n' | grep -v '^$' | awk -v f="$1" '{print $f}' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
last() { tail -1 "$WORK/days.tsv" | cut -f"$1"; }
{
  echo "## Retention: $DAYS days, forget --keep-last $KEEP and prune ($(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo
  echo "Command: \`DAYS=$DAYS KEEP=$KEEP CHURN=$CHURN ROUNDS=$ROUNDS bash bench/retention.sh\` (sauve $(git rev-parse --short HEAD), $(restic version | awk '{print $1, $2}'))."
  echo "Day 1: $(head -1 "$B/images.txt"); day $DAYS: ext4 uses $(last 2) MiB."
  echo
  echo "| step | wall s | CPU s | peak RSS MiB | rchar MiB | wchar MiB | read_bytes MiB | write_bytes MiB | repo before MiB | repo after MiB |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for key in "sauve forget" "sauve prune" "sauve forget --prune" "restic forget" "restic prune" "restic forget --prune"; do
    s=${samples["$key"]}
    case $key in sauve*) before=$(last 3) ;; *) before=$(last 4) ;; esac
    after=$(echo "$s" | median 8)
    printf '| %s | %s | %s | %.0f | %s | %s | %s | %s | %s | %s |\n' "$key" "$(echo "$s" | median 1)" "$(echo "$s" | median 2)" \
      "$(echo "$s" | median 3 | awk '{print $1/1024}')" "$(mib "$(echo "$s" | median 4)")" "$(mib "$(echo "$s" | median 5)")" \
      "$(mib "$(echo "$s" | median 6)")" "$(mib "$(echo "$s" | median 7)")" "$(mib "$before")" \
      "$([ "$after" = - ] && echo - || mib "$after")"
  done
  echo
  echo "Medians of $ROUNDS rounds. sauve prune --json bytes_read / bytes_written / after.bytes (MiB), per round: $(echo "${samples["sauve prune json"]}" | tr ';' '\n' | grep -v '^$' | awk '{printf "%s%.1f / %.1f / %.1f", (NR > 1 ? ", " : ""), $1 / 1048576, $2 / 1048576, $3 / 1048576}')."
  echo
  echo "Checked after the last round's runs:"
  for v in sauve sauve1; do echo "- $v: sauve check --read-data passed, ${SNAPS[$v]} snapshots left; restore latest: ${CMP[$v]}"; done
  for v in restic restic2; do echo "- $v: restic check passed, ${SNAPS[$v]} snapshots left; ${CMP[$v]}"; done
  echo
  echo "| day | ext4 used MiB | sauve repo MiB | growth | restic repo MiB | growth | sauve backup wall s / CPU s / RSS MiB | restic backup wall s / CPU s / RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|"
  awk -F'\t' 'NR > 1 { printf "| %d | %d | %.1f | %.1f | %.1f | %.1f | %.2f / %.2f / %.0f | %.2f / %.2f / %.0f |\n", $1, $2, $3/1048576, ($3-ps)/1048576, $4/1048576, ($4-pr)/1048576, $5, $6, $7/1024, $8, $9, $10/1024; ps = $3; pr = $4 }' "$WORK/days.tsv"
} > "$REPORT"
cat "$REPORT"
