#!/usr/bin/env bash
# cloud.sh — the reference disk backed up to and restored from real storage
# servers on this machine, by sauve and by the tools users would pick
# instead:
#
#   Azure Blob (Azurite):   sauve (SAS URL)   vs  dd | gzip | rclone rcat
#   S3 (versitygw, posix):  sauve             vs  dd | gzip | rclone rcat  and  restic
#
# For each: full backup (time, rate, bytes stored), an unchanged second
# backup (bytes on the wire both ways: what an incremental to the cloud
# costs) and a restore to a file (time). Wire bytes are counted by a TCP
# proxy in front of each server (bench/cloudtool), so every tool is
# measured the same way.
#
#   sudo bash bench/cloud.sh          # one command; about 15 minutes
#
# Needs the reference disk (bash ../shared/bench/make-disk.sh builds it;
# this script never rebuilds it) and the servers .ci/services installs.
# Prints a Markdown table and keeps it in bench/out/cloud-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMG=${IMG:-/tmp/bench/day1.img}
[ -f "$IMG" ] || { echo "missing $IMG: run 'bash ../shared/bench/make-disk.sh' first" >&2; exit 1; }
for t in rclone restic gzip gunzip /usr/bin/time python3; do
  command -v "$t" >/dev/null || { echo "missing $t (.ci/packages lists it)" >&2; exit 1; }
done
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH)/bin"
.ci/services >/dev/null

W=$(mktemp -d /var/tmp/sauve-cloudbench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/home" "$ROOT/bench/out"
go build -o "$W/sauve" ./cmd/sauve
go build -o "$W/cloudtool" ./bench/cloudtool
# A fresh home: no cache, config or credentials from this machine's user.
export HOME=$W/home SAUVE_PASSPHRASE= RCLONE_CONFIG=/dev/null XDG_CACHE_HOME=$W/home/.cache

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 does not open" >&2; exit 1; }

# --- servers, each behind a counting proxy ---------------------------------
AZ_ACCOUNT=devstoreaccount1
AZ_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
AZ_PORT=$(freeport)
.ci/azurite/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --location "$W/azurite" \
  --disableTelemetry --skipApiVersionCheck --silent & PIDS+=($!)
S3_PORT=$(freeport) S3_ACCESS=benchadmin S3_SECRET=bench-secret-0123456789
mkdir -p "$W/s3"
versitygw --access "$S3_ACCESS" --secret "$S3_SECRET" --port "127.0.0.1:$S3_PORT" --keep-alive --quiet posix "$W/s3" & PIDS+=($!)
waitport "$AZ_PORT"; waitport "$S3_PORT"

proxy() { # name port
  "$W/cloudtool" proxy -target "127.0.0.1:$2" -stats "$W/$1.stats" > "$W/$1.addr" & PIDS+=($!)
  for _ in $(seq 100); do [ -s "$W/$1.addr" ] && [ -s "$W/$1.stats" ] && return 0; sleep 0.1; done
  echo "proxy $1 did not start" >&2; exit 1
}
proxy az "$AZ_PORT"; proxy s3 "$S3_PORT"
AZX=$(cat "$W/az.addr") S3X=$(cat "$W/s3.addr")
wire() { python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["Up"], s["Down"])' "$W/$1.stats"; }

# Full backups and restores go straight to the server: a proxy copies
# every byte once more and would slow the fastest tool most. Unchanged
# backups go through the counting proxy: their bytes on the wire are the
# measure. Stored bytes come from the growth of the server's folder.
AZD=127.0.0.1:$AZ_PORT S3D=127.0.0.1:$S3_PORT
sas() { "$W/cloudtool" sas -endpoint "http://$1/$AZ_ACCOUNT" -account "$AZ_ACCOUNT" -key "$AZ_KEY" -container "$2"; }
SAS_D=$(sas "$AZD" sauve) SAS_X=$(sas "$AZX" sauve)
PSAS_D=$(sas "$AZD" pipeline) PSAS_X=$(sas "$AZX" pipeline)
for b in sauve pipeline restic; do "$W/cloudtool" mkbucket -endpoint "http://$S3D" -access "$S3_ACCESS" -secret "$S3_SECRET" -bucket "$b"; done
export AWS_ACCESS_KEY_ID=$S3_ACCESS AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset AWS_CA_BUNDLE
# rclone 1.60 builds https://ACCOUNT.ENDPOINT from an account and key; a
# SAS URL reaches the emulator's path-style address as given.
rclone_az() { echo "--azureblob-sas-url '$1'"; }
rclone_s3() { echo "--s3-provider Other --s3-access-key-id $S3_ACCESS --s3-secret-access-key $S3_SECRET --s3-endpoint http://$1 --s3-force-path-style=true"; }
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/home/.cache/restic

SIZE=$(stat -c %s "$IMG")
ROWS=()
stored() { du -sb "$W/$1" | cut -f1; }
# run LABEL SERVER CMD...: time, max RSS, bytes on the wire (through the
# proxy) and bytes the server stored, of one step.
run() {
  local label=$1 srv=$2; shift 2
  local dir=azurite; [ "$srv" = s3 ] && dir=s3
  read -r u0 d0 < <(wire "$srv")
  local s0; s0=$(stored $dir)
  /usr/bin/time -f '%e %M' -o "$W/time" bash -c "$*" > "$W/out" 2> "$W/err" || { echo "FAILED: $label"; cat "$W/err"; exit 1; }
  sleep 0.3
  read -r u1 d1 < <(wire "$srv")
  local s1; s1=$(stored $dir)
  read -r secs rss < "$W/time"
  LAST="$secs $(( (u1-u0) )) $(( (d1-d0) )) $rss $(( s1-s0 ))"
  printf '%-40s %7.1fs  wire up %10d down %10d  stored %10d  rss %7d KiB\n' "$label" "$secs" $((u1-u0)) $((d1-d0)) $((s1-s0)) "$rss" >&2
}
row() { # tool target full unchanged restore
  local f=($3) u=($4) r=($5)
  local rate; rate=$(python3 -c "print(f'{$SIZE/2**20/${f[0]}:.0f}')")
  local moved=$(( u[1] + u[2] ))
  local pct; pct=$(python3 -c "print(f'{100*$moved/$SIZE:.3f}')")
  ROWS+=("| $1 | $2 | ${f[0]} s ($rate MiB/s) | $(( f[4] >> 20 )) MiB | ${u[0]} s | $(( moved >> 10 )) KiB ($pct %) | ${r[0]} s | $(( f[3] >> 10 )) MiB |")
  eval "T_${1//[^a-z]/}_${2//[^a-z0-9]/}=${f[0]}"
}

echo "== Azure Blob (Azurite 3.37 via SAS URL)" >&2
run "sauve init" az "$W/sauve -q --repo '$SAS_D' init"
run "sauve backup (full)" az "$W/sauve -q --repo '$SAS_D' backup $IMG"; F=$LAST
run "sauve backup (unchanged, via proxy)" az "$W/sauve -q --repo '$SAS_X' backup $IMG"; U=$LAST
run "sauve restore" az "$W/sauve -q --repo '$SAS_D' restore latest $W/restore.img"; R=$LAST
rm -f "$W/restore.img"
row sauve azure "$F" "$U" "$R"

run "dd | gzip | rclone rcat (full)" az "dd if=$IMG bs=1M status=none | gzip | rclone rcat $(rclone_az "$PSAS_D") :azureblob:pipeline/day1.img.gz"; F=$LAST
run "dd | gzip | rclone rcat (again, via proxy)" az "dd if=$IMG bs=1M status=none | gzip | rclone rcat $(rclone_az "$PSAS_X") :azureblob:pipeline/day2.img.gz"; U=$LAST
run "rclone cat | gunzip" az "rclone cat $(rclone_az "$PSAS_D") :azureblob:pipeline/day1.img.gz | gunzip > $W/restore.img"; R=$LAST
rm -f "$W/restore.img"
row "dd, gzip, rclone" azure "$F" "$U" "$R"

echo "== S3 (versitygw $(sed -n 's/^VERSITYGW_VERSION=//p' .ci/services), posix backend)" >&2
run "sauve init" s3 "$W/sauve -q --repo s3://sauve/day1 --s3-endpoint http://$S3D init"
run "sauve backup (full)" s3 "$W/sauve -q --repo s3://sauve/day1 --s3-endpoint http://$S3D backup $IMG"; F=$LAST
run "sauve backup (unchanged, via proxy)" s3 "$W/sauve -q --repo s3://sauve/day1 --s3-endpoint http://$S3X backup $IMG"; U=$LAST
run "sauve restore" s3 "$W/sauve -q --repo s3://sauve/day1 --s3-endpoint http://$S3D restore latest $W/restore.img"; R=$LAST
rm -f "$W/restore.img"
row sauve s3 "$F" "$U" "$R"

# Every byte, as restic and the pipeline store it: the like-for-like row.
run "sauve init (--no-fs-skip repo)" s3 "$W/sauve -q --repo s3://sauve/raw --s3-endpoint http://$S3D init"
run "sauve backup --no-fs-skip (full)" s3 "$W/sauve -q --repo s3://sauve/raw --s3-endpoint http://$S3D backup --no-fs-skip $IMG"; F=$LAST
run "sauve backup --no-fs-skip (unchanged, via proxy)" s3 "$W/sauve -q --repo s3://sauve/raw --s3-endpoint http://$S3X backup --no-fs-skip $IMG"; U=$LAST
run "sauve restore (--no-fs-skip)" s3 "$W/sauve -q --repo s3://sauve/raw --s3-endpoint http://$S3D restore latest $W/restore.img"; R=$LAST
rm -f "$W/restore.img"
row "sauve --no-fs-skip" s3 "$F" "$U" "$R"

run "dd | gzip | rclone rcat (full)" s3 "dd if=$IMG bs=1M status=none | gzip | rclone rcat $(rclone_s3 "$S3D") :s3:pipeline/day1.img.gz"; F=$LAST
run "dd | gzip | rclone rcat (again, via proxy)" s3 "dd if=$IMG bs=1M status=none | gzip | rclone rcat $(rclone_s3 "$S3X") :s3:pipeline/day2.img.gz"; U=$LAST
run "rclone cat | gunzip" s3 "rclone cat $(rclone_s3 "$S3D") :s3:pipeline/day1.img.gz | gunzip > $W/restore.img"; R=$LAST
rm -f "$W/restore.img"
row "dd, gzip, rclone" s3 "$F" "$U" "$R"

RD="s3:http://$S3D/restic/day1" RX="s3:http://$S3X/restic/day1"
run "restic init" s3 "restic -r $RD init -q"
run "restic backup (full)" s3 "restic -r $RD backup -q $IMG"; F=$LAST
run "restic backup (unchanged, via proxy)" s3 "restic -r $RX backup -q $IMG"; U=$LAST
run "restic restore" s3 "restic -r $RD restore -q latest --target $W/restic-restore"; R=$LAST
rm -rf "$W/restic-restore"
row "restic $(restic version | cut -d' ' -f2)" s3 "$F" "$U" "$R"

OUT="$ROOT/bench/out/cloud-$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "Reference disk: $IMG, $((SIZE >> 20)) MiB ($(du -m "$IMG" | cut -f1) MiB allocated). $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "| tool | server | full backup | stored | unchanged backup | on the wire | restore | max RSS (full) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  python3 - "$T_sauve_azure" "$T_ddgziprclone_azure" "$T_sauve_s3" "$T_ddgziprclone_s3" "$T_restic_s3" "$T_sauvenofsskip_s3" <<'PY'
import sys
sa, ga, ss, gs, rs, ns = map(float, sys.argv[1:])
print(f"Full backup, sauve against dd | gzip | rclone rcat: {ga/sa:.1f}x faster to Azurite, {gs/ss:.1f}x to versitygw; against restic (versitygw): {rs/ss:.1f}x, {rs/ns:.1f}x with --no-fs-skip.")
PY
} | tee "$OUT"
