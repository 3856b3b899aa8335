#!/usr/bin/env bash
# vdisk-convert.sh — issue 5's benchmark: converting the reference disk from
# raw to qcow2 and to vmdk (monolithicSparse) with sauve and with
# `qemu-img convert`, in one run, on one machine.
#
#   bash bench/vdisk-convert.sh              # writes bench/out/vdisk-convert.md
#   ROUNDS=5 bash bench/vdisk-convert.sh     # more rounds (default 3; the median is reported)
#
# The image is ../shared/bench/make-disk.sh's /tmp/bench/day1.img (4 GiB raw
# disk: MBR, one ext4 partition, 1.6 GiB of files and about 1 GiB of deleted
# but non-zero free space); this script builds it only if it is missing.
# Every run starts with the image in the page cache. sauve syncs its output
# before renaming it into place (it starts writeback as it goes, so the
# final sync finds little left); qemu-img's default cache mode for a
# convert target is "unsafe" (nothing synced), so it is also timed with
# -t writeback, which syncs, for a like-for-like figure. Outputs go to $WORK
# (default /var/tmp/sauve-bench-vdisk). It also exports the disk from a
# repository (backed up first with --no-fs-skip, so the output is identical
# to the source) and times the pipeline export replaces: restore the raw
# disk, then convert it with qemu-img. Each output is checked with `qemu-img compare`
# (sauve's --skip-free output is checked with `qemu-img check` only: its free
# space reads as zeros by design).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-bench-vdisk}
ROUNDS=${ROUNDS:-3}
OUT=bench/out
mkdir -p "$OUT" "$WORK"
REPORT=$OUT/vdisk-convert.md
IMG=$B/day1.img

[ -f "$IMG" ] || bash ../shared/bench/make-disk.sh >/dev/null
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install qemu-utils" >&2; exit 1; }
go build -o "$WORK/sauve" ./cmd/sauve
SAUVE=$WORK/sauve

mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }

# Each round runs every tool once, in turn, so that the load of a shared
# machine drifting during the run weighs on all of them alike; the median
# over the rounds is kept.
declare -A WALLS CPU RSS SIZE ALLOC OUTF CMDS
labels=()
add() { # add LABEL OUTPUT CMD...
  local label=$1 out=$2; shift 2
  labels+=("$label"); OUTF[$label]=$out; CMDS[$label]=$(printf '%q ' "$@")
}
# Export from a repository: sauve export against the pipeline it replaces
# (restore the raw disk, then qemu-img convert it).
export SAUVE_REPO=$WORK/repo SAUVE_PASSPHRASE= XDG_CONFIG_HOME=$WORK/config XDG_CACHE_HOME=$WORK/cache
rm -rf "$WORK/repo" "$WORK/config" "$WORK/cache"
"$SAUVE" init > /dev/null
"$SAUVE" backup "$IMG" --no-fs-skip > /dev/null
add "sauve restore + qemu-img convert -O qcow2" "$WORK/rq.qcow2" sh -c "rm -f '$WORK/r.img' && '$SAUVE' restore latest '$WORK/r.img' && sync -f '$WORK/r.img' && qemu-img convert -f raw -O qcow2 '$WORK/r.img' '$WORK/rq.qcow2' && rm -f '$WORK/r.img'"
add "sauve export (qcow2)" "$WORK/export.qcow2" "$SAUVE" export latest "$WORK/export.qcow2" --force
for fmt in qcow2 vmdk; do
  add "qemu-img convert -O $fmt" "$WORK/qemu.$fmt" qemu-img convert -f raw -O "$fmt" "$IMG" "$WORK/qemu.$fmt"
  add "qemu-img convert -t writeback -O $fmt" "$WORK/qemuwb.$fmt" qemu-img convert -t writeback -f raw -O "$fmt" "$IMG" "$WORK/qemuwb.$fmt"
  add "sauve convert ($fmt)" "$WORK/sauve.$fmt" "$SAUVE" convert "$IMG" "$WORK/sauve.$fmt" --format "$fmt" --force
  add "sauve convert --skip-free ($fmt)" "$WORK/free.$fmt" "$SAUVE" convert "$IMG" "$WORK/free.$fmt" --format "$fmt" --force --skip-free
done
for round in $(seq "$ROUNDS"); do
  for label in "${labels[@]}"; do
    out=${OUTF[$label]}
    rm -f "$out"
    cat "$IMG" > /dev/null
    sync
    /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" bash -c "${CMDS[$label]}" > /dev/null 2> "$WORK/err.txt" || { echo "$label failed:" >&2; cat "$WORK/err.txt" >&2; exit 1; }
    read -r wall user sys rss <<< "$(tail -1 "$WORK/time.txt")"
    WALLS[$label]="${WALLS[$label]:-} $wall"
    CPU[$label]="${CPU[$label]:-} $(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')"
    RSS[$label]=$((rss / 1024))
    SIZE[$label]=$(stat -c %s "$out")
    ALLOC[$label]=$(( $(stat -c %b "$out") * 512 ))
    echo "round $round: $label: $wall s" >&2
  done
done
median() { printf '%s\n' $1 | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
qemu-img compare -q -f raw -F qcow2 "$IMG" "$WORK/export.qcow2"
for fmt in qcow2 vmdk; do
  qemu-img compare -q -f raw -F "$fmt" "$IMG" "$WORK/qemu.$fmt"
  qemu-img compare -q -f raw -F "$fmt" "$IMG" "$WORK/sauve.$fmt"
  qemu-img check -q -f "$fmt" "$WORK/sauve.$fmt"
  qemu-img check -q -f "$fmt" "$WORK/free.$fmt"
done

{
  echo "## Raw to qcow2 and vmdk: sauve convert against qemu-img convert ($(date -u +%F), $(nproc) cores)"
  echo
  echo "Command: \`bash bench/vdisk-convert.sh\` (ROUNDS=$ROUNDS, median wall time; $(qemu-img --version | head -1))."
  echo "Source: \`$IMG\`, $(mib "$(stat -c %s "$IMG")") MiB raw, $(mib $(( $(stat -c %b "$IMG") * 512 ))) MiB allocated."
  echo
  echo "| tool | wall s (median) | wall s, each round | CPU s (median) | peak RSS MiB | output MiB | on disk MiB |"
  echo "| --- | ---: | --- | ---: | ---: | ---: | ---: |"
  for r in "${labels[@]}"; do
    echo "| $r | $(median "${WALLS[$r]}") | ${WALLS[$r]# } | $(median "${CPU[$r]}") | ${RSS[$r]} | $(mib "${SIZE[$r]}") | $(mib "${ALLOC[$r]}") |"
  done
} > "$REPORT"
cat "$REPORT"
rm -rf "$WORK"/qemu.* "$WORK"/qemuwb.* "$WORK"/sauve.* "$WORK"/free.* "$WORK"/export.* "$WORK"/rq.* "$WORK/repo" "$WORK/cache" "$WORK/config"
