#!/usr/bin/env bash
# pg-quiesce.sh — issue 12's benchmark: what a backup costs a PostgreSQL
# under pgbench load, crash-consistent and application-consistent, against
# pg_basebackup of the same database.
#
#   bash bench/pg-quiesce.sh            # as root; writes bench/out/pg-quiesce.md
#   ROUNDS=5 SCALE=20 bash bench/pg-quiesce.sh
#
# PGDATA is on an ext4 in an image file on a reflink XFS (both loop-mounted),
# the point-in-time path this machine has. pgbench (-c 2, unthrottled, -P 1)
# runs throughout; each round takes, in turn (interleaved):
#   crash     sauve backup IMAGE                       reflink copy, ext4 frozen
#   writer    sauve backup IMAGE --writer postgresql   CHECKPOINT first
#   agent     sauve backup IMAGE --quiesce agent://... --no-freeze
#             (a sauve agent on this host: postgresql writer + ext4 freeze)
#   basebackup pg_basebackup -D DIR -X stream -c fast
# with a few seconds of load before each (the baseline) and after.
# Reported per mode (medians of the rounds): backup wall and CPU seconds,
# how long writes were frozen (sauve's frozen_seconds; the agent's window),
# the quiesce window, pgbench's tps during the backup against the seconds
# before it, the seconds in which tps fell under half the baseline (the
# time the application was slowed), and the restore time to a running
# database: sauve restore + mount + postgres's crash recovery, or
# pg_basebackup's copy + start.
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
WORK=${WORK:-/var/tmp/sauve-bench-pg}
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-10}
OUT=bench/out
REPORT=$OUT/pg-quiesce.md
[ "$(id -u)" = 0 ] || { echo "must run as root (loop mounts, fsfreeze)" >&2; exit 1; }
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
for t in "$BIN/postgres" "$BIN/pg_basebackup" "$BIN/pgbench" mkfs.xfs mkfs.ext4 /usr/bin/time python3; do
  command -v "$t" > /dev/null || { echo "missing: $t (apt-get install postgresql xfsprogs e2fsprogs time)" >&2; exit 1; }
done
rm -rf "$WORK"; mkdir -p "$WORK" "$OUT"; chmod 755 "$WORK"
export SAUVE_PASSPHRASE=bench XDG_CONFIG_HOME=$WORK/config XDG_CACHE_HOME=$WORK/cache
SAUVE=$WORK/sauve
CGO_ENABLED=0 go build -o "$SAUVE" ./cmd/sauve
SAUVE_REV=$(git log -1 --format='%h %s' | cut -c1-70)

PIDS=() MOUNTS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null; done
  # runuser does not pass every signal on: the postmasters by their data.
  pkill -QUIT -f "postgres -D $WORK" 2> /dev/null
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2> /dev/null; done
  pkill -KILL -f "postgres -D $WORK" 2> /dev/null
  sleep 0.5
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do fsfreeze -u "${MOUNTS[$i]}" 2> /dev/null; umount "${MOUNTS[$i]}" 2> /dev/null; done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
aspg() { runuser -u postgres -- "$@"; }

# --- the filesystems and the cluster -------------------------------------------
truncate -s 2G "$WORK/xfs.img"; mkfs.xfs -q -m reflink=1 "$WORK/xfs.img"
mkdir -p "$WORK/xfs"; mount -o loop "$WORK/xfs.img" "$WORK/xfs"; MOUNTS+=("$WORK/xfs")
IMG=$WORK/xfs/pg.img
truncate -s 1G "$IMG"; mkfs.ext4 -q -F "$IMG"
INNER=$WORK/inner; mkdir -p "$INNER"; mount -o loop "$IMG" "$INNER"; MOUNTS+=("$INNER")
SOCK=$WORK/sock; mkdir -p "$SOCK" "$INNER/pgdata"; chown postgres: "$SOCK" "$INNER/pgdata"; chmod 700 "$INNER/pgdata"
aspg "$BIN/initdb" -D "$INNER/pgdata" -U postgres -A trust -N --locale=C > /dev/null
echo "max_wal_size = 256MB" >> "$INNER/pgdata/postgresql.conf"
echo "local replication postgres trust" >> "$INNER/pgdata/pg_hba.conf"
start_pg() { # start_pg DATA SOCKDIR PORT -> pid in $PG_PID, ready seconds in $PG_READY
  local t0; t0=$(date +%s.%N)
  aspg "$BIN/postgres" -D "$1" -k "$2" -p "$3" -c listen_addresses= > "$2/server.log" 2>&1 &
  PG_PID=$!; PIDS+=("$PG_PID")
  until "$BIN/pg_isready" -q -h "$2" -p "$3"; do sleep 0.05; done
  PG_READY=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
}
start_pg "$INNER/pgdata" "$SOCK" 5499
PGC=(-h "$SOCK" -p 5499 -U postgres)
"$BIN/pgbench" "${PGC[@]}" -i -q -s "$SCALE" postgres > /dev/null 2>&1
"$BIN/psql" "${PGC[@]}" -qc CHECKPOINT postgres
DSN="postgresql:host=$SOCK port=5499 user=postgres dbname=postgres"

# The agent, on this host, freezing the ext4 with its postgresql writer.
"$SAUVE" agent keygen --out "$WORK/agent.key" > /dev/null
"$SAUVE" agent keygen --out "$WORK/config/sauve/agent/caller.key" > /dev/null
"$SAUVE" agent authorize "$WORK/config/sauve/agent/caller.key.pub" --file "$WORK/authorized" > /dev/null
"$SAUVE" agent run --listen tcp:127.0.0.1:7499 --key "$WORK/agent.key" --authorized "$WORK/authorized" \
  --state "$WORK/agent.state" --log "$WORK/agent.log" --mount "$INNER" --writer "$DSN" 2> "$WORK/agent.err" &
PIDS+=($!)
until (exec 3<> /dev/tcp/127.0.0.1/7499) 2> /dev/null; do sleep 0.1; done

"$SAUVE" init --repo "$WORK/repo" > /dev/null
# The first backup stores the cluster; every later one is a day-2 backup
# of a running database, as a nightly one is.
"$SAUVE" backup --repo "$WORK/repo" "$IMG" > /dev/null 2>&1

# pgbench for the whole run, its per-second progress in a log.
"$BIN/pgbench" "${PGC[@]}" -n -c 2 -j 2 -T 36000 -P 1 postgres > /dev/null 2> "$WORK/pgbench.log" &
PIDS+=($!); BENCH_PID=$!
T0=$(date +%s.%N)
now() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
sleep 4

MODES=(crash writer agent basebackup)
declare -A WALL CPU FROZEN WINDOW START END RESTORE
add() { local -n a=$1; a[$2]="${a[$2]:-} $3"; }
backup_cmd() {
  case $1 in
    crash) echo "$SAUVE backup --json --repo $WORK/repo $IMG" ;;
    writer) echo "$SAUVE backup --json --repo $WORK/repo $IMG --writer" ;;
    agent) echo "$SAUVE backup --json --repo $WORK/repo $IMG --quiesce agent://127.0.0.1:7499 --agent-key $WORK/agent.key.pub --no-freeze" ;;
  esac
}
json() { python3 -c "import json,sys; d=json.load(open('$WORK/out.json')); q=d.get('quiesce') or {}; print({'frozen': d.get('frozen_seconds', 0), 'window': q.get('window_seconds', 0), 'snap': d.get('snapshot','')}['$1'])"; }
for round in $(seq "$ROUNDS"); do
  for m in "${MODES[@]}"; do
    sleep 3 # baseline
    s=$(now)
    if [ "$m" = basebackup ]; then
      rm -rf "$WORK/bb"
      /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S" "$BIN/pg_basebackup" "${PGC[@]}" -D "$WORK/bb" -X stream -c fast
      add FROZEN "$m" 0; add WINDOW "$m" 0
    else
      cmd=$(backup_cmd "$m")
      if [ "$m" = writer ]; then
        /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S" $cmd "$DSN" > "$WORK/out.json"
      else
        /usr/bin/time -o "$WORK/time.txt" -f "%e %U %S" $cmd > "$WORK/out.json"
      fi
      w=$(json window)
      f=$(json frozen); [ "$m" = agent ] && f=$w
      add FROZEN "$m" "$f"; add WINDOW "$m" "$w"
      [ "$round" = "$ROUNDS" ] && eval "SNAP_$m=$(json snap)"
    fi
    e=$(now)
    add START "$m" "$s"; add END "$m" "$e"
    read -r wall user sys < "$WORK/time.txt"
    add WALL "$m" "$wall"; add CPU "$m" "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')"
    echo "round $round: $m: $wall s" >&2
  done
done
sleep 3
kill "$BENCH_PID"; wait "$BENCH_PID" 2> /dev/null || true

# --- restore to a running database (last round's copies) -----------------------
restore_check() { # restore_check MODE -> seconds in RESTORE[MODE]
  local m=$1 t0 dir=$WORK/r-$1 port=$((5500 + RANDOM % 400))
  mkdir -p "$dir/sock"; chown postgres: "$dir/sock"
  t0=$(date +%s.%N)
  if [ "$m" = basebackup ]; then
    chmod 700 "$WORK/bb"; chown -R postgres: "$WORK/bb"
    start_pg "$WORK/bb" "$dir/sock" "$port"
  else
    local snap_var="SNAP_$m"
    "$SAUVE" restore --repo "$WORK/repo" "${!snap_var}" "$dir/pg.img" > /dev/null
    mkdir -p "$dir/mnt"; mount -o loop "$dir/pg.img" "$dir/mnt"; MOUNTS+=("$dir/mnt")
    rm -f "$dir/mnt/pgdata/postmaster.pid" # names the source's live postmaster
    start_pg "$dir/mnt/pgdata" "$dir/sock" "$port"
  fi
  RESTORE[$m]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  local sums
  sums=$("$BIN/psql" -h "$dir/sock" -p "$port" -U postgres -Atc "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(bbalance) FROM pgbench_branches) AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT coalesce(sum(delta),0) FROM pgbench_history)" postgres)
  [ "$sums" = t ] || { echo "$m: the restored database breaks pgbench's invariant" >&2; exit 1; }
  pkill -INT -f "postgres -D $dir" 2> /dev/null || true
  kill "$PG_PID" 2> /dev/null; wait "$PG_PID" 2> /dev/null || true
  sleep 0.5
  [ "$m" = basebackup ] || { umount "$dir/mnt" && unset 'MOUNTS[-1]'; }
}
for m in "${MODES[@]}"; do restore_check "$m"; done

# --- report ---------------------------------------------------------------------
median() { printf '%s\n' $1 | sort -g | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)] }'; }
m() { median "${1:-}"; }
m3() { awk -v x="$(median "${1:-}")" 'BEGIN { printf "%.3f", x }'; }
# tps_stats START... END...: baseline tps (the 3 s before each backup),
# tps during, and the seconds under half the baseline, medians of rounds.
tps_stats() {
  python3 - "$WORK/pgbench.log" "$1" "$2" << 'EOF'
import re, statistics, sys
log, starts, ends = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
pts = [(float(a), float(b)) for a, b in re.findall(r"progress: ([0-9.]+) s, ([0-9.]+) tps", open(log).read())]
base, during, slow = [], [], []
for s, e in zip(starts, ends):
    b = [t for x, t in pts if s - 3 <= x - 1 and x <= s]
    d = [t for x, t in pts if x > s and x - 1 < e + 1]
    if not b or not d:
        continue
    bb = statistics.median(b)
    base.append(bb); during.append(statistics.mean(d)); slow.append(sum(1 for t in d if t < bb / 2))
med = lambda v: statistics.median(v) if v else float("nan")
print(f"{med(base):.0f} {med(during):.0f} {med(slow):.0f}")
EOF
}
{
  echo "## PostgreSQL under pgbench load: crash- and application-consistent backups against pg_basebackup ($(date -u +%F), $(nproc) cores)"
  echo
  echo "Command: \`ROUNDS=$ROUNDS SCALE=$SCALE bash bench/pg-quiesce.sh\` (medians of $ROUNDS interleaved rounds). sauve \`$SAUVE_REV\`; $("$BIN/postgres" --version); pgbench -c 2 -j 2 unthrottled, scale $SCALE, PGDATA on an ext4 in an image file on a reflink XFS. sauve's backups are day-2 backups (the repository holds the cluster already)."
  echo
  echo "| mode | backup wall s | CPU s | writes frozen s | quiesce window s | tps before | tps during | s under half the tps | restore to running s |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for md in "${MODES[@]}"; do
    read -r tb td slow <<< "$(tps_stats "${START[$md]}" "${END[$md]}")"
    echo "| $md | $(m "${WALL[$md]}") | $(m "${CPU[$md]}") | $(m3 "${FROZEN[$md]}") | $(m3 "${WINDOW[$md]}") | $tb | $td | $slow | ${RESTORE[$md]} |"
  done
  echo
  echo "crash: \`sauve backup IMAGE\` (a reflink copy while the ext4 is frozen: crash-consistent, PostgreSQL recovers from it). writer: \`--writer postgresql\` (CHECKPOINT just before the copy: application-consistent, a shorter recovery). agent: \`--quiesce agent://\` to a sauve agent on the same host that runs the postgresql writer and freezes the ext4 itself (\`--no-freeze\` on the backup side); its writes-frozen figure is its whole window. basebackup: \`pg_basebackup -X stream -c fast\` (a full copy every time). Restore: sauve restore of the image, loop mount and PostgreSQL's crash recovery until it accepts connections; for pg_basebackup, start on its copy. Every restored database keeps pgbench's invariant (sum of account balances = branch balances = history deltas)."
} > "$REPORT"
cat "$REPORT"
