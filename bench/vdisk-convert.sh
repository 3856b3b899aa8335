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
# Every run starts with the image in the page cache, and both tools sync
# their output (qemu-img flushes on close; sauve fsyncs before renaming), so
# the figures compare the tools, not the disk. Outputs go to $WORK (default
# /var/tmp/sauve-bench-vdisk). Each output is checked with `qemu-img compare`
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

# run LABEL OUTPUT CMD... — times CMD (wall, CPU, peak RSS) ROUNDS times,
# keeps the median wall time, and records the output's size.
declare -A WALL CPU RSS SIZE ALLOC
run() {
  local label=$1 out=$2; shift 2
  local walls=() t
  for _ in $(seq "$ROUNDS"); do
    rm -f "$out"
    cat "$IMG" > /dev/null
    sync
    /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S %M" "$@" > /dev/null 2> "$WORK/err.txt" || { echo "$label failed:" >&2; cat "$WORK/err.txt" >&2; exit 1; }
    t=$(tail -1 "$WORK/time.txt")
    read -r wall user sys rss <<< "$t"
    walls+=("$wall")
    CPU[$label]=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    RSS[$label]=$((rss / 1024))
  done
  WALL[$label]=$(printf '%s\n' "${walls[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  SIZE[$label]=$(stat -c %s "$out")
  ALLOC[$label]=$(( $(stat -c %b "$out") * 512 ))
  echo "$label: ${walls[*]} s" >&2
}

rows=()
for fmt in qcow2 vmdk; do
  q=$WORK/qemu.$fmt s=$WORK/sauve.$fmt f=$WORK/free.$fmt
  run "qemu-img convert -O $fmt" "$q" qemu-img convert -f raw -O "$fmt" "$IMG" "$q"
  run "sauve convert ($fmt)" "$s" "$SAUVE" convert "$IMG" "$s" --format "$fmt" --force
  run "sauve convert --skip-free ($fmt)" "$f" "$SAUVE" convert "$IMG" "$f" --format "$fmt" --force --skip-free
  qemu-img compare -f raw -F "$fmt" "$IMG" "$q" > /dev/null
  qemu-img compare -f raw -F "$fmt" "$IMG" "$s" > /dev/null
  qemu-img check -q -f "$fmt" "$s"
  qemu-img check -q -f "$fmt" "$f"
  rows+=("qemu-img convert -O $fmt" "sauve convert ($fmt)" "sauve convert --skip-free ($fmt)")
done

{
  echo "## Raw to qcow2 and vmdk: sauve convert against qemu-img convert ($(date -u +%F), $(nproc) cores)"
  echo
  echo "Command: \`bash bench/vdisk-convert.sh\` (ROUNDS=$ROUNDS, median wall time; $(qemu-img --version | head -1))."
  echo "Source: \`$IMG\`, $(mib "$(stat -c %s "$IMG")") MiB raw, $(mib $(( $(stat -c %b "$IMG") * 512 ))) MiB allocated."
  echo
  echo "| tool | wall s | CPU s | peak RSS MiB | output MiB | on disk MiB |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  for r in "${rows[@]}"; do
    echo "| $r | ${WALL[$r]} | ${CPU[$r]} | ${RSS[$r]} | $(mib "${SIZE[$r]}") | $(mib "${ALLOC[$r]}") |"
  done
} > "$REPORT"
cat "$REPORT"
rm -f "$WORK"/qemu.* "$WORK"/sauve.* "$WORK"/free.*
