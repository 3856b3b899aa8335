#!/usr/bin/env bash
# fileget.sh — issue 14's benchmark: getting files back and reading disks
# over NBD from a snapshot, against the path users have today.
#
#   bash bench/fileget.sh            # as root; ROUNDS=3; writes bench/out/fileget.md
#
# The disk is the reference day 1 ($BENCH_DIR/day1.img, from
# ../shared/bench/make-disk.sh) with /bench/big.bin (100 MiB of random
# bytes) and /bench/small/ (10 000 files of 1-8 KiB in 100 folders) added
# to its ext4 partition, backed up once into a local repository under
# WORK. Each round, in an order that rotates:
#   get-big    sauve get latest:1/bench/big.bin - (to stdout)
#   peer-big   sauve restore latest IMG, mount -o ro,loop, cat the file
#   get-small  sauve get latest:1/bench/small DEST
#   peer-small sauve restore latest IMG, mount -o ro,loop, cp -a the folder
#   nbd-sauve  sauve serve nbd latest, nbdcopy of the disk to null:
#   nbd-qemu   qemu-nbd -r of the raw image, nbdcopy of it to null: (the limit)
# bench/ttfb.py times each: seconds to the first byte on stdout (the
# steps that print the file), seconds in all, CPU seconds (user+system,
# children included) and the peak RSS of the largest process. For the
# nbd steps the server's CPU and RSS are those of the server, read from
# /usr/bin/time around it. The repository and images stay in the page
# cache (a local folder: no cold-cache or cloud figures).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-fileget}
ROUNDS=${ROUNDS:-3}
OUT=bench/out
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
[ "$(id -u)" = 0 ] || { echo "must run as root (loop mounts)" >&2; exit 1; }
for t in qemu-nbd nbdcopy /usr/bin/time mount; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done
bash ../shared/bench/make-disk.sh > /dev/null
# shellcheck disable=SC1091
source "$B/disk.env"
mkdir -p "$WORK/bin" "$WORK/mnt" "$OUT"
go build -o "$WORK/bin/sauve" ./cmd/sauve
S=$WORK/bin/sauve
TTFB="$PY $PWD/bench/ttfb.py"
export XDG_CONFIG_HOME=$WORK/cfg XDG_CACHE_HOME=$WORK/cache SAUVE_REPO=$WORK/repo SAUVE_PASSPHRASE=
IMG=$WORK/disk.img

if [ ! -f "$WORK/disk.done" ]; then
  echo "== building $IMG and its snapshot"
  rm -rf "$WORK/repo" "$WORK/cfg" "$WORK/cache"
  cp --sparse=always "$B/day1.img" "$IMG"
  mount -o loop,offset="$PART_OFFSET" "$IMG" "$WORK/mnt"
  mkdir -p "$WORK/mnt/bench"
  head -c 100M /dev/urandom > "$WORK/mnt/bench/big.bin"
  "$PY" - "$WORK/mnt/bench/small" <<'PY'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(14)
for d in range(100):
    os.makedirs(f"{root}/d{d:03}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/d{d:03}/f{f:03}.txt", "wb") as out:
            out.write(rnd.randbytes(rnd.randint(1024, 8192)))
PY
  (cd "$WORK/mnt/bench" && sha256sum big.bin > "$WORK/big.sha256" && find small -type f -print0 | sort -z | xargs -0 sha256sum > "$WORK/small.sha256")
  umount "$WORK/mnt"
  "$S" init > /dev/null
  "$S" backup "$IMG" > /dev/null
  touch "$WORK/disk.done"
fi

declare -A samples
record() { # record KEY "TTFB WALL CPU RSS"
  samples["$1"]+="$2;"
}
run() { # run KEY CMD... — timed by ttfb.py, stdout discarded
  local key=$1; shift
  sync
  local r
  r=$($TTFB "$@") || { echo "$key failed" >&2; exit 1; }
  record "$key" "$r"
}
peer_mount() { # restore the snapshot to an image and loop-mount its partition
  rm -f "$WORK/restored.img"
  "$S" restore latest "$WORK/restored.img" > /dev/null
  mount -o ro,loop,offset="$PART_OFFSET" "$WORK/restored.img" "$WORK/mnt"
}
export -f peer_mount
export S WORK PART_OFFSET

step() {
  case $1 in
  get-big) run "$1" "$S" get latest:1/bench/big.bin - ;;
  peer-big) run "$1" bash -c 'peer_mount && cat "$WORK/mnt/bench/big.bin"; rc=$?; umount "$WORK/mnt"; exit $rc' ;;
  get-small)
    rm -rf "$WORK/dest"
    run "$1" "$S" get latest:1/bench/small "$WORK/dest"
    (cd "$WORK/dest" && find small -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum 2>/dev/null || true) > "$WORK/got.sha256"
    if ! cmp -s "$WORK/got.sha256" "$WORK/small.sha256"; then
      # get DEST may put the folder's content directly in DEST
      (cd "$WORK" && mv dest small && find small -type f -print0 | sort -z | xargs -0 sha256sum > got.sha256 && mv small dest)
      cmp -s "$WORK/got.sha256" "$WORK/small.sha256" || { echo "get-small: files differ" >&2; exit 1; }
    fi ;;
  peer-small)
    rm -rf "$WORK/dest"
    run "$1" bash -c 'peer_mount && cp -a "$WORK/mnt/bench/small" "$WORK/dest"; rc=$?; umount "$WORK/mnt"; exit $rc' ;;
  nbd-sauve|nbd-qemu)
    local sock=$WORK/nbd.sock
    rm -f "$sock"
    if [ "$1" = nbd-sauve ]; then
      /usr/bin/time -o "$WORK/server.time" -f "%U %S %M" "$S" serve nbd latest --listen "unix:$sock" 2> "$WORK/server.log" &
    else
      /usr/bin/time -o "$WORK/server.time" -f "%U %S %M" qemu-nbd -r -f raw -x disk -k "$sock" "$IMG" 2> "$WORK/server.log" &
    fi
    local pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    [ -S "$sock" ] || { echo "$1: no socket" >&2; cat "$WORK/server.log" >&2; exit 1; }
    local uri="nbd+unix:///?socket=$sock"
    [ "$1" = nbd-qemu ] && uri="nbd+unix:///disk?socket=$sock"
    local r
    r=$($TTFB nbdcopy "$uri" null:) || { echo "$1: nbdcopy failed" >&2; cat "$WORK/server.log" >&2; exit 1; }
    kill -INT "$(pgrep -P "$pid" | head -1)" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    read -r su ss srss < <(tail -1 "$WORK/server.time")
    local ttfb wall ccpu crss
    read -r ttfb wall ccpu crss <<< "$r"
    record "$1" "$ttfb $wall $(awk -v a="$ccpu" -v u="$su" -v s="$ss" 'BEGIN{print a+u+s}') $srss" ;;
  esac
}

steps=(get-big peer-big get-small peer-small nbd-sauve nbd-qemu)
# Check once that get prints the file exactly.
"$S" get latest:1/bench/big.bin - | sha256sum | cut -d' ' -f1 | cmp -s - <(cut -d' ' -f1 "$WORK/big.sha256") || { echo "get-big: content differs" >&2; exit 1; }
for r in $(seq "$ROUNDS"); do
  n=${#steps[@]}
  for i in $(seq 0 $((n - 1))); do
    s=${steps[$(((i + r) % n))]}
    echo "== round $r: $s"
    step "$s"
  done
done

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
col() { # col KEY N — median of field N of KEY's samples
  IFS=';' read -ra xs <<< "${samples[$1]}"
  for x in "${xs[@]}"; do echo "$x" | awk -v n="$2" '{print $n}'; done | median
}
size=$(stat -c %s "$IMG")
{
  echo "## File-level restore and NBD reads ($(date +%F), $(nproc) cores)"
  echo
  echo "Command: \`ROUNDS=$ROUNDS bash bench/fileget.sh\` (sauve $(git rev-parse --short HEAD), $(qemu-nbd --version | head -1), nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}')). Medians of $ROUNDS rounds."
  echo
  echo "| step | first byte s | wall s | CPU s | peak RSS MiB |"
  echo "|---|---|---|---|---|"
  for k in "${steps[@]}"; do
    ft=$(col "$k" 1)
    [ "$ft" = -1.000 ] && ft=-
    echo "| $k | $ft | $(col "$k" 2) | $(col "$k" 3) | $(( $(col "$k" 4) / 1024 )) |"
  done
  echo
  for k in nbd-sauve nbd-qemu; do
    w=$(col "$k" 2)
    echo "- $k: $(awk -v s="$size" -v w="$w" 'BEGIN{printf "%.0f", s/w/1048576}') MiB/s over the $((size >> 20)) MiB disk"
  done
} | tee "$OUT/fileget.md"
