#!/usr/bin/env bash
# parity.sh — what `backup --parity N` costs on the reference disk, and how
# long `repair packs` takes to rebuild one lost pack.
#
#   bash bench/parity.sh                 # as root; ROUNDS=3 N=8; writes bench/out/parity.md
#
# Each round, interleaved: a full backup of day 1 into a fresh repository
# without parity and one with --parity N; then, in the parity repository,
# one pack is deleted and `repair packs` rebuilds it (checked by hash).
# Medians of wall, CPU (user+sys) and peak RSS; repository sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-parity}
OUT=bench/out
ROUNDS=${ROUNDS:-3}
N=${N:-8}
mkdir -p "$OUT" "$WORK/bin"
bash ../shared/bench/make-disk.sh > /dev/null
go build -o "$WORK/bin/sauve" ./cmd/sauve
S=$WORK/bin/sauve
declare -A samples
measure() { # measure KEY CMD...
  local key=$1; shift
  sync
  /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" "$@" > /dev/null 2> "$WORK/err.txt" || { echo "$key failed:" >&2; cat "$WORK/err.txt" >&2; exit 1; }
  read -r wall user sys rss < <(tail -1 "$WORK/time.txt")
  samples["$key"]+="$wall $(awk -v u="$user" -v s="$sys" 'BEGIN{print u+s}') $rss;"
}
sizes=()
for r in $(seq "$ROUNDS"); do
  for mode in none parity; do
    R=$WORK/repo-$mode
    rm -rf "$R" "$WORK/cfg-$mode" "$WORK/cache-$mode"
    export XDG_CONFIG_HOME=$WORK/cfg-$mode XDG_CACHE_HOME=$WORK/cache-$mode SAUVE_REPO=$R
    "$S" init > /dev/null
    cat "$B/day1.img" > /dev/null
    flags=""
    [ "$mode" = parity ] && flags="--parity $N"
    measure "backup ($mode)" "$S" backup $flags "$B/day1.img"
    sizes+=("$mode data=$(du -sb "$R/data" | cut -f1) parity=$(du -sb "$R/parity" 2>/dev/null | cut -f1 || echo 0)")
    if [ "$mode" = parity ]; then
      victim=$(find "$R/data" -type f | sort | sed -n 3p)
      want=$(b3sum --no-names "$victim" 2>/dev/null || sha256sum "$victim" | cut -d' ' -f1)
      rm "$victim"
      measure "repair packs (one lost pack)" "$S" repair packs
      got=$(b3sum --no-names "$victim" 2>/dev/null || sha256sum "$victim" | cut -d' ' -f1)
      [ "$want" = "$got" ] || { echo "rebuilt pack differs" >&2; exit 1; }
    fi
    unset XDG_CONFIG_HOME XDG_CACHE_HOME SAUVE_REPO
  done
done
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
{
  echo "| step | wall s | CPU s | peak RSS MiB |"
  echo "|---|---|---|---|"
  for k in "backup (none)" "backup (parity)" "repair packs (one lost pack)"; do
    IFS=';' read -ra xs <<< "${samples[$k]}"
    w=$(for x in "${xs[@]}"; do echo "$x" | awk '{print $1}'; done | median)
    c=$(for x in "${xs[@]}"; do echo "$x" | awk '{print $2}'; done | median)
    m=$(for x in "${xs[@]}"; do echo "$x" | awk '{print $3}'; done | median)
    echo "| $k | $w | $c | $((m / 1024)) |"
  done
  echo
  printf '%s\n' "${sizes[@]}" | sort -u
} | tee "$OUT/parity.md"
rm -rf "$WORK"
