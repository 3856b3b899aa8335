#!/usr/bin/env bash
# trust-cost.sh — issue 9's benchmark: what the trust model costs.
#
#   bash bench/trust-cost.sh                      # as root; writes bench/out/trust-cost.md
#   OLD=/path/to/old/sauve bash bench/trust-cost.sh   # also time an older binary, interleaved
#
# On the reference disk of ../shared/bench/make-disk.sh:
#  1. Storage: two hosts with write-only keys back up the same day-1 disk.
#     Before format 2 the second stored nothing (it trusted any index
#     entry); now it stores its own copy until the owner's
#     check --read-data endorses the first writer's packs. Measured: the
#     bytes each backup adds, and the same after the endorsement.
#     An isolated writer (key export --isolated) shares nothing: it stores
#     the whole disk whatever the others hold.
#  2. Time: full backup, day-2 backup and restore with this sauve (and
#     $OLD, interleaved, when given), wall and CPU seconds, peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-trust}
OUT=bench/out
mkdir -p "$OUT" "$WORK/bin"
REPORT=$OUT/trust-cost.md
bash ../shared/bench/make-disk.sh > /dev/null
go build -o "$WORK/bin/sauve" ./cmd/sauve
NEW=$WORK/bin/sauve
OLD=${OLD:-}
ROUNDS=${ROUNDS:-3}

dsize() { du -sb "$1" 2>/dev/null | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
fresh() { # fresh NAME: a new repository under $WORK/NAME
  local R=$WORK/$1
  rm -rf "$R"; mkdir -p "$R"
  export XDG_CONFIG_HOME=$R/cfg XDG_CACHE_HOME=$R/cache SAUVE_REPO=$R/repo
}

{
  echo "## Cost of the trust model ($(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo
  echo "Command: \`bash bench/trust-cost.sh\`. Images: $(head -3 "$B/images.txt" | tr '\n' ' ')"
  echo
  echo "### Storage: two writers back up the same disk"
  echo
  echo "| step | repository growth MiB |"
  echo "|---|---|"
} > "$REPORT"

fresh storage
"$NEW" init > /dev/null
"$NEW" key export --write-only --name web1 "$WORK/storage/web1.key" > /dev/null
"$NEW" key export --write-only --name web2 "$WORK/storage/web2.key" > /dev/null
"$NEW" key export --write-only --isolated --name iso "$WORK/storage/iso.key" > /dev/null
step() { # step LABEL CMD...
  local label=$1; shift
  local before after
  before=$(dsize "$SAUVE_REPO")
  "$@" > /dev/null 2>&1
  after=$(dsize "$SAUVE_REPO")
  echo "| $label | $(mib $((after - before))) |" >> "$REPORT"
}
step "web1: day 1" env SAUVE_KEY="$WORK/storage/web1.key" XDG_CACHE_HOME="$WORK/storage/c1" "$NEW" backup "$B/day1.img" --host web1
step "web2: the same disk, before any endorsement" env SAUVE_KEY="$WORK/storage/web2.key" XDG_CACHE_HOME="$WORK/storage/c2" "$NEW" backup "$B/day1.img" --host web2
step "owner: check --read-data (endorses both writers' packs)" "$NEW" check --read-data
step "web2: the same disk again, after the endorsement" env SAUVE_KEY="$WORK/storage/web2.key" XDG_CACHE_HOME="$WORK/storage/c2" "$NEW" backup "$B/day1.img" --host web2
step "web1: day 2" env SAUVE_KEY="$WORK/storage/web1.key" XDG_CACHE_HOME="$WORK/storage/c1" "$NEW" backup "$B/day2.img" --host web1
step "web2: day 2 (web1's day-2 chunks not yet endorsed)" env SAUVE_KEY="$WORK/storage/web2.key" XDG_CACHE_HOME="$WORK/storage/c2" "$NEW" backup "$B/day2.img" --host web2
step "iso (isolated namespace): day 1, after all of the above" env SAUVE_KEY="$WORK/storage/iso.key" XDG_CACHE_HOME="$WORK/storage/c3" "$NEW" backup "$B/day1.img" --host iso
step "iso: day 2" env SAUVE_KEY="$WORK/storage/iso.key" XDG_CACHE_HOME="$WORK/storage/c3" "$NEW" backup "$B/day2.img" --host iso
unset SAUVE_KEY

{
  echo
  echo "### Time, this sauve${OLD:+ against $OLD}, interleaved, medians of $ROUNDS"
  echo
  echo "| binary | step | wall s | CPU s | peak RSS MiB |"
  echo "|---|---|---|---|---|"
} >> "$REPORT"

bins=("$NEW")
[ -n "$OLD" ] && bins+=("$OLD")
declare -A samples
measure() { # measure BIN STEP CMD...
  local bin=$1 label=$2; shift 2
  sync
  /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" "$@" > /dev/null 2> "$WORK/err.txt" || { cat "$WORK/err.txt" >&2; exit 1; }
  read -r wall user sys rss < <(tail -1 "$WORK/time.txt")
  samples["$bin|$label"]+="$wall $(awk -v u="$user" -v s="$sys" 'BEGIN{print u+s}') $rss;"
}
for round in $(seq "$ROUNDS"); do
  for bin in "${bins[@]}"; do
    fresh "time-$(basename "$bin")"
    "$bin" init > /dev/null
    # One disk path, day 1 then day 2, as a host's /dev/vda would be.
    ln -sfn "$B/day1.img" "$WORK/disk.img"
    cat "$B/day1.img" > /dev/null
    measure "$bin" "full backup, day 1" "$bin" backup "$WORK/disk.img"
    ln -sfn "$B/day2.img" "$WORK/disk.img"
    cat "$B/day2.img" > /dev/null
    measure "$bin" "backup day 2" "$bin" backup "$WORK/disk.img"
    rm -f "$WORK/restore.img"
    measure "$bin" "restore day 2" "$bin" restore latest "$WORK/restore.img"
    rm -f "$WORK/restore.img"
    measure "$bin" "check --read-data" "$bin" check --read-data
  done
done
median() { tr ';' '\n' | grep -v '^$' | awk -v f="$1" '{print $f}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for bin in "${bins[@]}"; do
  for label in "full backup, day 1" "backup day 2" "restore day 2" "check --read-data"; do
    s=${samples["$bin|$label"]}
    printf '| %s | %s | %s | %s | %.0f |\n' "$(basename "$bin")" "$label" "$(echo "$s" | median 1)" "$(echo "$s" | median 2)" "$(echo "$s" | median 3 | awk '{print $1/1024}')" >> "$REPORT"
  done
done
cat "$REPORT"
