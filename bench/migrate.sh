#!/usr/bin/env bash
# migrate.sh — issue 15's benchmark: a first pass and delta passes of
# 'sauve migrate' on the reference disk into a raw image, a qcow2, a
# VMDK and over SSH to 127.0.0.1, against what a user scripts today: dd
# of the whole disk at every pass (raw), dd then 'qemu-img convert' at
# every pass (qcow2, VMDK), and rsync -aHAX --inplace of the mounted
# filesystem for the delta. And the cut-over: --final with the source's
# filesystem mounted, frozen for the last delta.
#
#   bash bench/migrate.sh                # as root; ROUNDS=3; writes bench/out/migrate.md
#   SSH=0 bash bench/migrate.sh          # without the SSH rows
#
# Two deltas after the first pass of day 1:
#   day2   the reference disk's day 2 (../shared/bench/make-disk.sh: in-place
#          partial overwrites, whole-file replacements by rename, appends,
#          50 MiB of new files, deletions);
#   2pct   day 1 with 2% of its used blocks rewritten in place: day 1's
#          ext4 loop-mounted read-write, every 7th regular file of more
#          than 16 KiB in path order (LC_ALL=C) rewritten whole in place
#          (dd conv=notrunc, the same blocks) with seeded AES-CTR bytes,
#          until the files rewritten add up to 2% of the bytes df says
#          used; then unmounted (its journal, inode tables and bitmaps
#          change too, as on a real machine). Built once, kept as the
#          blocks it changed ($WORK/churn2.patch); its statistics go in
#          the report.
# Each delta follows a first pass of its own onto a new target (so every
# round times two first passes), on the same source file (inode), as a
# migration of one disk does.
#
# sauve's SSH target is a file on 127.0.0.1 written by 'sauve
# migrate-receive' under an sshd this script starts (port SSH_PORT,
# default 22022; keys in $WORK/ssh); its CPU time is the sauve side's
# only (the receiving sauve runs under sshd).
#
# WORK (default /var/tmp/sauve-migrate) holds the sources, the targets and
# the state; the reference images come from ../shared/bench/make-disk.sh
# ($BENCH_DIR, default /tmp/bench). All in the page cache as far as it
# holds: the figures are CPU and copy costs more than disk speed. Each
# step is timed by /usr/bin/time (wall, user+system CPU); medians of
# ROUNDS, the rounds interleaving every step (the machine may be shared).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-/tmp/bench}
WORK=${WORK:-/var/tmp/sauve-migrate}
ROUNDS=${ROUNDS:-3}
SSH=${SSH:-1}
SSH_PORT=${SSH_PORT:-22022}
OUT=bench/out
[ "$(id -u)" = 0 ] || { echo "must run as root (loop mounts, fsfreeze)" >&2; exit 1; }
for t in rsync /usr/bin/time mount fsfreeze qemu-img openssl python3; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done
bash ../shared/bench/make-disk.sh > /dev/null
# shellcheck disable=SC1091
source "$B/disk.env"
mkdir -p "$WORK/bin" "$WORK/a" "$WORK/b" "$OUT"
# At most two 4 GiB sparse images (2.6 GiB each) and a target at once.
avail=$(df -B1 --output=avail "$WORK" | tail -1)
[ "$avail" -gt $((6 << 30)) ] || { echo "$WORK has $((avail >> 30)) GiB free, needs 6: set WORK (a tmpfs such as /dev/shm/sauve-migrate will do)" >&2; exit 1; }
go build -o "$WORK/bin/sauve" ./cmd/sauve
S=$WORK/bin/sauve
export XDG_CACHE_HOME=$WORK/cache
declare -A samples
timed() { # timed KEY CMD... — wall and CPU of CMD
  local key=$1; shift
  sync
  /usr/bin/time -o "$WORK/t" -f "%e %U %S" "$@" > "$WORK/out" 2> "$WORK/err" || { echo "$key failed:" >&2; cat "$WORK/err" >&2; exit 1; }
  read -r w u s < "$WORK/t"
  samples["$key"]+="$w $(awk -v u="$u" -v s="$s" 'BEGIN{print u+s}');"
}
json_field() { grep -o "\"$1\":[0-9]*" "$WORK/out" | head -1 | cut -d: -f2 || true; }
written() { samples["$1 w"]+="${2:-0};"; }
SSHD_PID=
cleanup() {
  umount "$WORK/a" 2>/dev/null || true
  umount "$WORK/b" 2>/dev/null || true
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null || true
}
trap cleanup EXIT
# put SRC — the source file gets SRC's bytes, keeping its inode.
put() { cp --sparse=always "$1" "$WORK/src.img"; }

# The 2% churn is kept as the 4 KiB blocks it changed ($WORK/churn2.patch,
# offset and bytes), applied to a copy of day 1 when needed: a second
# 4 GiB image would not fit beside the others.
make_churn2() {
  [ -f "$WORK/churn2.patch" ] && [ "$WORK/churn2.patch" -nt "$B/day1.img" ] && return
  echo "== building the 2% churn"
  put "$B/day1.img"
  mount -o loop,offset="$PART_OFFSET" "$WORK/src.img" "$WORK/a"
  local used budget n=0 bytes=0 f size
  used=$(df -B1 --output=used "$WORK/a" | tail -1)
  budget=$((used / 50))
  (cd "$WORK/a" && find . -type f -size +16k -printf '%s\t%p\n' | LC_ALL=C sort -t "$(printf '\t')" -k2 |
    awk -F '\t' -v b="$budget" 'NR % 7 == 0 && !done { if (t + $1 > b) { done = 1; next }; t += $1; print $2 }') > "$WORK/churn2.list"
  while IFS= read -r f; do
    size=$(stat -c %s "$WORK/a/$f")
    head -c "$size" /dev/zero | openssl enc -aes-128-ctr -nosalt -pbkdf2 -iter 1 -pass "pass:churn2 $f" |
      dd of="$WORK/a/$f" conv=notrunc status=none
    n=$((n + 1)); bytes=$((bytes + size))
  done < "$WORK/churn2.list"
  umount "$WORK/a"
  local diff
  diff=$(python3 - "$B/day1.img" "$WORK/src.img" "$WORK/churn2.patch" <<'PY2'
import struct, sys
a, b, out = open(sys.argv[1], 'rb'), open(sys.argv[2], 'rb'), open(sys.argv[3] + '.tmp', 'wb')
off = mib = blk = 0
while True:
    x, y = a.read(1 << 20), b.read(1 << 20)
    if not x:
        break
    if x != y:
        mib += 1
        for i in range(0, len(x), 4096):
            if x[i:i + 4096] != y[i:i + 4096]:
                blk += 1
                out.write(struct.pack('<Q', off + i) + y[i:i + 4096])
    off += len(x)
out.close()
import os
os.rename(sys.argv[3] + '.tmp', sys.argv[3])
print(f"{mib} of the 4096 1 MiB chunks and {blk} 4 KiB blocks ({blk * 4096 >> 20} MiB) differ from day 1")
PY2
)
  echo "$n files, $((bytes >> 20)) MiB rewritten in place (2% of the $((used >> 20)) MiB used); $diff" > "$WORK/churn2.stats"
}

# put_churn2 — the source gets day 1 + the 2% churn.
put_churn2() {
  put "$B/day1.img"
  python3 - "$WORK/churn2.patch" "$WORK/src.img" <<'PY2'
import os, sys
p, f = open(sys.argv[1], 'rb'), os.open(sys.argv[2], os.O_WRONLY)
while rec := p.read(8 + 4096):
    os.pwrite(f, rec[8:], int.from_bytes(rec[:8], 'little'))
os.close(f)
PY2
}

start_sshd() {
  local d=$WORK/ssh
  rm -rf "$d"; mkdir -p "$d" /run/sshd; chmod 700 "$d"
  ssh-keygen -q -t ed25519 -N '' -f "$d/host" -C bench
  ssh-keygen -q -t ed25519 -N '' -f "$d/id" -C bench
  cp "$d/id.pub" "$d/authorized_keys"
  cat > "$d/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $d/host
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers root
LogLevel ERROR
EOF
  "$(command -v sshd || echo /usr/sbin/sshd)" -D -e -f "$d/sshd_config" 2> "$d/log" &
  SSHD_PID=$!
  echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$d/host.pub")" > "$d/known_hosts"
  export SAUVE_SSH_KEY=$d/id SAUVE_SSH_KNOWN_HOSTS=$d/known_hosts SAUVE_REMOTE_SAUVE=$S
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/"$SSH_PORT") 2>/dev/null && return; sleep 0.1; done
  echo "sshd did not start:" >&2; cat "$d/log" >&2; exit 1
}

# sauve_rows KIND TARGET FILE — for each delta, a first pass of day 1
# onto a new TARGET (FILE is where it lands here), then the delta pass.
sauve_rows() {
  local kind=$1 target=$2 file=$3 delta
  for delta in day2 2pct; do
    rm -rf "$WORK/cache" "$file"
    put "$B/day1.img"
    timed "sauve $kind first" "$S" migrate "$WORK/src.img" "$target" --json
    written "sauve $kind first" "$(json_field bytes_written)"
    if [ "$delta" = 2pct ]; then put_churn2; else put "$B/day2.img"; fi
    timed "sauve $kind delta-$delta" "$S" migrate "$WORK/src.img" "$target" --json
    written "sauve $kind delta-$delta" "$(json_field bytes_written)"
  done
}

# The cut-over, after sauve_rows raw: the source (day 1 + 2%) mounted
# read-write as a running machine's disk, 16 MiB written, a pass, 16 MiB
# more, then --final freezes it for the last delta.
cutover_row() {
  mount -o loop,offset="$PART_OFFSET" "$WORK/src.img" "$WORK/a"
  dd if=/dev/urandom of="$WORK/a/cutover.bin" bs=1M count=16 conv=fsync status=none
  "$S" migrate "$WORK/src.img" "$WORK/sauve.img" > /dev/null
  dd if=/dev/urandom of="$WORK/a/cutover2.bin" bs=1M count=16 conv=fsync status=none
  timed "sauve raw final" "$S" migrate "$WORK/src.img" "$WORK/sauve.img" --final --json
  written "sauve raw final" "$(json_field bytes_written)"
  samples[frozen]+="$(grep -o "\"frozen_seconds\":[0-9.]*" "$WORK/out" | head -1 | cut -d: -f2 || true);"
  umount "$WORK/a"
}

# dd (raw) and dd + qemu-img convert (qcow2, vmdk): the whole disk at
# every pass, each into a new sparse file (dd conv=sparse: writing the
# zeros of a 4 GiB disk over the previous copy would not fit here); the
# conversions write a new image from that copy.
dd_rows() {
  local pass src fmt
  for pass in first delta-day2; do
    src=$B/day1.img; [ "$pass" != first ] && src=$B/day2.img
    rm -f "$WORK/dd.img"
    timed "dd raw $pass" dd if="$src" of="$WORK/dd.img" bs=4M conv=sparse status=none
    written "dd raw $pass" "$(du -B1 "$WORK/dd.img" | cut -f1)"
    for fmt in qcow2 vmdk; do
      rm -f "$WORK/dd.img" "$WORK/ddconv.$fmt"
      timed "dd+convert $fmt $pass" sh -c "dd if='$src' of='$WORK/dd.img' bs=4M conv=sparse status=none && qemu-img convert -f raw -O $fmt '$WORK/dd.img' '$WORK/ddconv.$fmt'"
      written "dd+convert $fmt $pass" "$(( $(du -B1 "$WORK/dd.img" | cut -f1) + $(du -B1 "$WORK/ddconv.$fmt" | cut -f1) ))"
      rm -f "$WORK/ddconv.$fmt"
    done
  done
  rm -f "$WORK/dd.img"
}

# rsync of the mounted filesystems, day 1's copy brought to each delta.
rsync_rows() {
  local delta src
  for delta in day2 2pct; do
    # A copy of its own (another job may hold a loop device on the
    # reference image, which mount refuses to overlap).
    if [ "$delta" = 2pct ]; then put_churn2; else put "$B/day2.img"; fi
    src=$WORK/src.img
    cp --sparse=always "$B/day1.img" "$WORK/rsync.img"
    mount -o ro,loop,offset="$PART_OFFSET" "$src" "$WORK/a"
    mount -o loop,offset="$PART_OFFSET" "$WORK/rsync.img" "$WORK/b"
    timed "rsync fs delta-$delta" rsync -aHAX --inplace --delete --stats "$WORK/a/" "$WORK/b/"
    written "rsync fs delta-$delta" "$(sed -n 's/^Total transferred file size: \([0-9,]*\).*/\1/p' "$WORK/out" | tr -d ,)"
    umount "$WORK/b"; umount "$WORK/a"
  done
  rm -f "$WORK/rsync.img"
}

# A repository holding day 1 and day 2 (backed up once), for the passes
# from snapshots: a migration seeded from the nightly backups. The peer
# is sauve restore of the same snapshots (the second with --delta, which
# reads the target back).
SNAP_ENV=(env SAUVE_REPO="$WORK/repo" XDG_CONFIG_HOME="$WORK/cfg")
make_repo() {
  [ -f "$WORK/repo.ids" ] && [ "$WORK/repo.ids" -nt "$S" ] && return
  echo "== backing up day 1 and day 2"
  rm -rf "$WORK/repo" "$WORK/cfg"
  "${SNAP_ENV[@]}" "$S" init > /dev/null
  put "$B/day1.img"
  "${SNAP_ENV[@]}" "$S" backup "$WORK/src.img" > /dev/null
  put "$B/day2.img"
  "${SNAP_ENV[@]}" "$S" backup "$WORK/src.img" > /dev/null
  "${SNAP_ENV[@]}" "$S" snapshots --json | python3 -c '
import json, sys
for s in sorted(json.load(sys.stdin), key=lambda s: s["time"]):
    print(s["id"])' > "$WORK/repo.ids"
}

# snapshot_rows — a first pass from day 1's snapshot onto a new raw
# target, then the delta pass from day 2's; restore beside it.
snapshot_rows() {
  local id1 id2
  id1=$(sed -n 1p "$WORK/repo.ids"); id2=$(sed -n 2p "$WORK/repo.ids")
  rm -rf "$WORK/cache" "$WORK/snap.img" "$WORK/restore.img"
  timed "sauve snapshot first" "${SNAP_ENV[@]}" "$S" migrate "$id1" "$WORK/snap.img" --json
  written "sauve snapshot first" "$(json_field bytes_written)"
  timed "sauve snapshot delta-day2" "${SNAP_ENV[@]}" "$S" migrate "$id2" "$WORK/snap.img" --json
  written "sauve snapshot delta-day2" "$(json_field bytes_written)"
  rm -f "$WORK/snap.img"
  timed "restore snapshot first" "${SNAP_ENV[@]}" "$S" restore "$id1" "$WORK/restore.img"
  written "restore snapshot first" "$(du -B1 "$WORK/restore.img" | cut -f1)"
  timed "restore snapshot delta-day2" "${SNAP_ENV[@]}" "$S" restore "$id2" "$WORK/restore.img" --delta
  rm -f "$WORK/restore.img"
}

make_churn2
[ -z "${REPORT_ONLY:-}" ] && make_repo
[ "$SSH" = 1 ] && [ -z "${REPORT_ONLY:-}" ] && start_sshd
# REPORT_ONLY=1 makes the report again from the samples of the rounds
# run last.
if [ -n "${REPORT_ONLY:-}" ]; then
  # shellcheck disable=SC1091
  source "$WORK/samples.sh"
  ROUNDS=$(tr ';' '\n' <<< "${samples[dd raw first]}" | grep -c .) # one a round
fi
for r in $(seq "$ROUNDS"); do
  [ -n "${REPORT_ONLY:-}" ] && break
  echo "== round $r"
  sauve_rows raw "$WORK/sauve.img" "$WORK/sauve.img"
  cutover_row
  rm -f "$WORK/sauve.img"
  sauve_rows qcow2 "$WORK/sauve.qcow2" "$WORK/sauve.qcow2"; rm -f "$WORK/sauve.qcow2"
  sauve_rows vmdk "$WORK/sauve.vmdk" "$WORK/sauve.vmdk"; rm -f "$WORK/sauve.vmdk"
  if [ "$SSH" = 1 ]; then
    sauve_rows ssh "ssh://root@127.0.0.1:$SSH_PORT$WORK/ssh.img" "$WORK/ssh.img"; rm -f "$WORK/ssh.img"
  fi
  rm -f "$WORK/src.img"
  dd_rows
  rsync_rows
  snapshot_rows
  declare -p samples > "$WORK/samples.sh" # a report can be made again from it
done

median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
col() { IFS=';' read -ra xs <<< "${samples[$1]:-}"; for x in "${xs[@]}"; do echo "$x" | awk -v n="$2" '{print $n}'; done | median; }
mibs() { local b; b=$(col "$1 w" 1); if [ -n "$b" ]; then echo $((b >> 20)); else echo -; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.0f%%", 100 * a / b; else print "-" }'; }
rows=()
for kind in raw qcow2 vmdk ssh; do
  [ "$kind" = ssh ] && [ "$SSH" != 1 ] && continue
  for p in first delta-day2 delta-2pct; do rows+=("sauve $kind $p"); done
  [ "$kind" = raw ] && rows+=("sauve raw final")
done
for p in first delta-day2; do rows+=("dd raw $p" "dd+convert qcow2 $p" "dd+convert vmdk $p"); done
rows+=("rsync fs delta-day2" "rsync fs delta-2pct")
rows+=("sauve snapshot first" "sauve snapshot delta-day2" "restore snapshot first" "restore snapshot delta-day2")
{
  echo "## Migration passes on the reference disk (issue 15) ($(date +%F), $(nproc) cores)"
  echo
  echo "Command: \`ROUNDS=$ROUNDS bash bench/migrate.sh\` (sauve $(git rev-parse --short HEAD), $(rsync --version | head -1 | awk '{print $1, $3}'), $(qemu-img --version | head -1)). Medians of $ROUNDS rounds, interleaved."
  echo "2% churn: $(cat "$WORK/churn2.stats")."
  echo
  echo "| tool | target | pass | wall s | CPU s | MiB written | wall vs first pass |"
  echo "|---|---|---|---|---|---|---|"
  for k in "${rows[@]}"; do
    read -r tool target pass <<< "$k"
    first="$tool $target first"
    [ "$tool" = rsync ] && first="sauve raw first"
    echo "| $tool | $target | $pass | $(col "$k" 1) | $(col "$k" 2) | $(mibs "$k") | $( [ "$pass" = first ] && echo - || ratio "$(col "$k" 1)" "$(col "$first" 1)") |"
  done
  echo
  echo "- --final (sauve raw final): writes frozen for $(col frozen 1) s (median)"
} | tee "$OUT/migrate.md"
