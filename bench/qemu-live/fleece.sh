#!/usr/bin/env bash
# fleece.sh CTL NODE DIR OUT — the classic QEMU fleecing backup that
# bench/qemu-live.sh times as a peer: a qcow2 overlay over the running
# drive's node NODE, a blockdev-backup sync=none into it (copy-before-write:
# the overlay keeps the point in time), an NBD export of the overlay,
# `qemu-img convert` of the export to OUT, then everything torn down.
# CTL is a QMP socket of the VM; DIR holds the overlay and the NBD socket.
# Writes DIR/fleece-freeze.txt: how long the transaction took (the only
# moment guest I/O is drained).
set -euo pipefail
ctl=$1 node=$2 dir=$3 out=$4
q() { /usr/bin/python3 "$(dirname "$0")/qmp.py" "$@" > /dev/null; }
size=$(/usr/bin/python3 "$(dirname "$0")/qmp.py" cmd "$ctl" query-named-block-nodes \
  | /usr/bin/python3 -c "import json,sys; print([n['image']['virtual-size'] for n in json.load(sys.stdin) if n['node-name'] == '$node'][0])")
rm -f "$dir/fleece.qcow2" "$dir/nbd.sock" "$out"
qemu-img create -q -f qcow2 "$dir/fleece.qcow2" "$size"
q cmd "$ctl" blockdev-add "{\"driver\":\"qcow2\",\"node-name\":\"fleece\",\"file\":{\"driver\":\"file\",\"filename\":\"$dir/fleece.qcow2\"},\"backing\":\"$node\"}"
/usr/bin/python3 "$(dirname "$0")/qmp.py" timed "$ctl" transaction \
  "{\"actions\":[{\"type\":\"blockdev-backup\",\"data\":{\"device\":\"$node\",\"target\":\"fleece\",\"sync\":\"none\",\"job-id\":\"fleecing\"}}]}" > "$dir/fleece-freeze.txt"
q cmd "$ctl" nbd-server-start "{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$dir/nbd.sock\"}}}"
q cmd "$ctl" block-export-add '{"type":"nbd","id":"fleece-exp","node-name":"fleece","name":"fleece"}'
qemu-img convert -O qcow2 "nbd+unix:///fleece?socket=$dir/nbd.sock" "$out"
q cmd "$ctl" block-export-del '{"id":"fleece-exp"}'
q cmd "$ctl" nbd-server-stop
q cmd "$ctl" block-job-cancel '{"device":"fleecing","force":true}'
for _ in $(seq 50); do
  [ "$(/usr/bin/python3 "$(dirname "$0")/qmp.py" cmd "$ctl" query-block-jobs)" = "[]" ] && break
  sleep 0.1
done
q cmd "$ctl" blockdev-del '{"node-name":"fleece"}'
rm -f "$dir/fleece.qcow2"
