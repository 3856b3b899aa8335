#!/usr/bin/env bash
# ab.sh — two sauve binaries side by side on the reference disk, for a
# change that must not be slower (issue 10's "before and after").
#
#   OLD=/path/to/old/sauve bash bench/ab.sh     # as root; writes bench/out/ab.md
#   ROUNDS=5 OLD=... bash bench/ab.sh
#
# The new binary is built from this tree. Each round runs, for each binary
# in turn (interleaved, so that the machine's noise falls on both): full
# backup of day 1, the same again (unchanged), day 2, restore of day 2 into a
# new file, export of day 2 to qcow2; by default and with --no-fs-skip.
# The report gives medians of the rounds: wall and CPU seconds (user+sys),
# peak RSS, and repository growth.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-ab}
OUT=bench/out
OLD=${OLD:?give OLD=/path/to/the/old/sauve}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT" "$WORK/bin"
REPORT=$OUT/ab.md
bash ../shared/bench/make-disk.sh > /dev/null
go build -o "$WORK/bin/sauve" ./cmd/sauve
NEW=$WORK/bin/sauve

dsize() { du -sb "$1" 2>/dev/null | cut -f1; }
declare -A samples
measure() { # measure KEY GROWTH_DIR CMD...
  local key=$1 dir=$2; shift 2
  local before=0 after=0
  [ -n "$dir" ] && before=$(dsize "$dir")
  sync
  /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" "$@" > /dev/null 2> "$WORK/err.txt" || { echo "$key failed:" >&2; cat "$WORK/err.txt" >&2; exit 1; }
  [ -n "$dir" ] && after=$(dsize "$dir")
  read -r wall user sys rss < <(tail -1 "$WORK/time.txt")
  samples["$key"]+="$wall $(awk -v u="$user" -v s="$sys" 'BEGIN{print u+s}') $rss $((after - before));"
}
steps=("full backup, day 1" "backup day 1 again (unchanged)" "backup day 2" "restore day 2" "export day 2 to qcow2")
round() { # round BIN MODE FLAGS
  local bin=$1 mode=$2 flags=$3 R=$WORK/repo
  rm -rf "$R" "$WORK/cfg" "$WORK/cache" "$WORK/restore.img" "$WORK/out.qcow2"
  export XDG_CONFIG_HOME=$WORK/cfg XDG_CACHE_HOME=$WORK/cache SAUVE_REPO=$R
  "$bin" init > /dev/null
  ln -sfn "$B/day1.img" "$WORK/disk.img"
  cat "$B/day1.img" > /dev/null
  measure "$bin|$mode|${steps[0]}" "$R" "$bin" backup $flags "$WORK/disk.img"
  measure "$bin|$mode|${steps[1]}" "$R" "$bin" backup $flags "$WORK/disk.img"
  ln -sfn "$B/day2.img" "$WORK/disk.img"
  cat "$B/day2.img" > /dev/null
  measure "$bin|$mode|${steps[2]}" "$R" "$bin" backup $flags "$WORK/disk.img"
  measure "$bin|$mode|${steps[3]}" "" "$bin" restore latest "$WORK/restore.img"
  if [ -n "$flags" ]; then cmp "$B/day2.img" "$WORK/restore.img"; fi
  rm -f "$WORK/restore.img"
  measure "$bin|$mode|${steps[4]}" "" "$bin" export latest "$WORK/out.qcow2"
  rm -f "$WORK/out.qcow2"
  unset XDG_CONFIG_HOME XDG_CACHE_HOME SAUVE_REPO
}
modes=("default" "--no-fs-skip")
for r in $(seq "$ROUNDS"); do
  for mode in "${modes[@]}"; do
    flags=""; [ "$mode" != default ] && flags=$mode
    # The order turns every round: the first run after a round's last
    # restore was deleted may meet another page cache.
    if [ $((r % 2)) = 1 ]; then
      round "$NEW" "$mode" "$flags"; round "$OLD" "$mode" "$flags"
    else
      round "$OLD" "$mode" "$flags"; round "$NEW" "$mode" "$flags"
    fi
  done
done

median() { tr ';' '\n' | grep -v '^$' | awk -v f="$1" '{print $f}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
{
  echo "## This tree against $OLD ($(date -u +%F), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo
  echo "Command: \`OLD=$OLD bash bench/ab.sh\` (ROUNDS=$ROUNDS, interleaved, medians). Images: $(head -3 "$B/images.txt" | tr '\n' ' ')"
  echo
  echo "| mode | step | new wall s | old wall s | new CPU s | old CPU s | new RSS MiB | old RSS MiB | new growth MiB | old growth MiB |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for mode in "${modes[@]}"; do
    for step in "${steps[@]}"; do
      n=${samples["$NEW|$mode|$step"]}; o=${samples["$OLD|$mode|$step"]}
      printf '| %s | %s | %s | %s | %s | %s | %.0f | %.0f | %.1f | %.1f |\n' "$mode" "$step" \
        "$(echo "$n" | median 1)" "$(echo "$o" | median 1)" "$(echo "$n" | median 2)" "$(echo "$o" | median 2)" \
        "$(echo "$n" | median 3 | awk '{print $1/1024}')" "$(echo "$o" | median 3 | awk '{print $1/1024}')" \
        "$(echo "$n" | median 4 | awk '{print $1/1048576}')" "$(echo "$o" | median 4 | awk '{print $1/1048576}')"
    done
  done
} > "$REPORT"
cat "$REPORT"
