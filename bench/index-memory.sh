#!/usr/bin/env bash
# Index memory and startup against a synthetic repository (issue 13):
# $CHUNKS random chunk IDs (default 50 million, about 12.5 TiB of unique
# data at 256 KiB) in owner-signed index objects, with sparse packs so the
# listing shows them; then a real backup of the reference disk, with a cold
# and a warm cache, by this tree and by $OLD_REV (default: where this branch left main), and a
# backup of a 64 MiB file as the startup figure. After every run the
# repository goes back to the synthetic files (what the run added is
# deleted), so each run is the disk's first backup.
#
#   bash bench/index-memory.sh                 # 50 M
#   CHUNKS=10000000 bash bench/index-memory.sh
#   BINS=new bash bench/index-memory.sh        # only this tree
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${CHUNKS:-50000000}
OLD_REV=${OLD_REV:-$(git merge-base HEAD main)}
WORK=${WORK:-/var/tmp/sauve-idxmem}
DISK=${DISK:-/tmp/bench/day1.img}
REPORT=${REPORT:-$WORK/report-$CHUNKS.md}
[ -f "$DISK" ] || bash /work/shared/bench/make-disk.sh

mkdir -p "$WORK/bin"
go build -o "$WORK/bin/new" ./cmd/sauve
rm -rf "$WORK/old-src" && mkdir -p "$WORK/old-src"
git archive "$OLD_REV" | tar -x -C "$WORK/old-src"
(cd "$WORK/old-src" && go build -o "$WORK/bin/old" ./cmd/sauve)
[ -f "$WORK/small.img" ] || head -c 64M /dev/urandom > "$WORK/small.img"

R=$WORK/synth-$CHUNKS
export XDG_CONFIG_HOME=$R/cfg XDG_CACHE_HOME=$R/cache SAUVE_REPO=$R/repo
if [ ! -f "$R/built" ]; then
  rm -rf "$R"; mkdir -p "$R"
  "$WORK/bin/new" init > /dev/null
  start=$(date +%s)
  SAUVE_SYNTH_REPO=$SAUVE_REPO SAUVE_SYNTH_KEY=$(ls "$XDG_CONFIG_HOME"/sauve/keys/*.key) SAUVE_SYNTH_CHUNKS=$CHUNKS \
    go test -count=1 -timeout 2h -run 'TestSyntheticIndex$' -v ./internal/repo/ | grep -E 'chunks in|ok|FAIL'
  echo "built in $(( $(date +%s) - start )) s"
  (cd "$SAUVE_REPO" && find . -type f | sort) > "$R/files"
  touch "$R/built"
fi

# reset deletes what a run added to the repository.
reset() {
  (cd "$SAUVE_REPO" && find . -type f | sort | comm -13 "$R/files" - | xargs -r rm -f)
}
# measure NAME BIN ARGS...: one backup, wall and peak RSS.
measure() {
  local name=$1 bin=$2; shift 2
  sync
  /usr/bin/time -f '%e %M %U %S' -o "$WORK/time" "$WORK/bin/$bin" backup "$@" > "$WORK/out" 2>&1 || { cat "$WORK/out"; exit 1; }
  read -r wall rss user sys < "$WORK/time"
  local db=-
  [ -f "$XDG_CACHE_HOME"/sauve/*/index.db ] && db=$(du -m "$XDG_CACHE_HOME"/sauve/*/index.db | cut -f1)
  printf '| %s | %s | %s | %.0f | %s | %s |\n' "$bin" "$name" "$wall" "$(echo "$rss / 1024" | bc -l)" "$(echo "$user + $sys" | bc -l)" "$db" >> "$REPORT"
  tail -1 "$REPORT"
  reset
}

{
  echo "Command: \`CHUNKS=$CHUNKS bash bench/index-memory.sh\` ($(date -u +%F), $(nproc) cores, old = $(git rev-parse --short "$OLD_REV"), new = $(git rev-parse --short HEAD))."
  echo "Synthetic index: $CHUNKS entries, $(ls "$SAUVE_REPO/index" | wc -l) index objects ($(du -sm "$SAUVE_REPO/index" | cut -f1) MiB), $(find "$SAUVE_REPO/data" -type f | wc -l) packs."
  echo
  echo "| binary | run | wall s | peak RSS MiB | CPU s | index.db MiB |"
  echo "|---|---|---|---|---|---|"
} > "$REPORT"
for bin in ${BINS:-old new}; do
  rm -rf "$XDG_CACHE_HOME"
  measure "cold cache: backup of the 4 GiB disk" $bin "$DISK"
  measure "warm cache: backup of the 4 GiB disk" $bin "$DISK"
  measure "warm cache: backup of a 64 MiB file (startup)" $bin "$WORK/small.img"
  measure "no cache: backup of a 64 MiB file" $bin --no-cache "$WORK/small.img"
done
cat "$REPORT"
