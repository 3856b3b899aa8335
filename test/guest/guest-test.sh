#!/bin/bash
# The LVM test that runs inside the guest (test/guest/run.sh puts it on
# the payload disk /dev/vdc, mounted at /t, with sauve and seqblk): it
# makes a volume group on the scratch disk /dev/vdb, backs its logical
# volumes up while a writer writes them, and checks what sauve restores.
#
# Every step prints "STEP <name>: PASS|FAIL ..." and its details; the
# last line is "SAUVE-GUEST-RESULT: PASS" or "SAUVE-GUEST-RESULT: FAIL
# (steps)", which run.sh looks for.
set -u
export PATH=/t:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root SAUVE_PASSPHRASE=sauve-guest-test
export SAUVE_REPO=/w/repo XDG_CONFIG_HOME=/w/config XDG_CACHE_HOME=/w/cache
VG=sauvevg
# Writes of one block per position (4 KiB) scattered by this stride.
STRIDE=389
# say, pass, fail, show, result.
. /t/steps.sh
run() { say "+ $*"; "$@"; }

# leftovers lists the sauve snapshot volumes in the volume group.
leftovers() { lvs --noheadings -o lv_name "$VG" 2>/dev/null | tr -d ' ' | grep '^sauve-snap' || true; }

# json_field FILE KEY prints the first string value of KEY in FILE.
json_field() { grep -o "\"$2\": *\"[^\"]*\"" "$1" | head -n1 | sed 's/.*: *"\(.*\)"/\1/'; }

snapshot_count() { sauve snapshots --json 2>/dev/null | grep -c '"short_id"'; }

# start_writer PATH BLOCKS [ARGS...]: runs seqblk write in the background
# and waits until it has zeroed its region and made its first writes.
start_writer() {
	local path=$1 blocks=$2
	shift 2
	rm -f /run/ready /run/writer.out
	seqblk write -blocks "$blocks" -ready /run/ready "$@" "$path" >/run/writer.out 2>&1 &
	writer=$!
	for _ in $(seq 600); do
		[ -e /run/ready ] && return 0
		kill -0 "$writer" 2>/dev/null || break
		sleep 0.1
	done
	say "writer on $path did not start:"
	show /run/writer.out
	return 1
}

# stop_writer prints the number of the last write.
stop_writer() {
	kill -TERM "$writer" 2>/dev/null
	wait "$writer"
	sed -n 's/^last=//p' /run/writer.out
}

# backup NAME ARGS...: sauve backup --json into /w/NAME.json, .err.
backup() {
	local name=$1
	shift
	say "+ sauve backup $* --json"
	local s rc
	s=$(date +%s%N)
	timeout 600 sauve backup "$@" --json >"/w/$name.json" 2>"/w/$name.err"
	rc=$?
	say "  exit $rc after $(( ($(date +%s%N) - s) / 1000000 )) ms"
	show "/w/$name.err"
	return $rc
}

# check_cut NAME IMAGE BLOCKS LAST: the image holds writes 1..cut for a
# cut after the writer started and before it stopped.
check_cut() {
	local name=$1 img=$2 blocks=$3 last=$4 out cut
	out=$(seqblk check -blocks "$blocks" -stride $STRIDE "$img" 2>&1)
	local rc=$?
	echo "$out" | sed 's/^/    | /'
	cut=$(echo "$out" | sed -n 's/^cut=\([0-9]*\).*/\1/p')
	if [ $rc -ne 0 ]; then
		fail "$name" "restored image is torn (not one point in time of the writes)"
	elif [ -z "$cut" ] || [ "$cut" -lt 16 ] || [ "$cut" -gt "$last" ]; then
		fail "$name" "cut ${cut:-?} is not within the writer's run (16..$last)"
	elif [ "$cut" -eq "$last" ]; then
		fail "$name" "cut $cut is the writer's last write: no write landed after the copy was taken, so the test showed nothing"
	else
		pass "$name" "one point in time: writes 1..$cut of $last"
	fi
}

check_lvm_copy() {
	local name=$1 json=$2 copy inuse
	copy=$(json_field "$json" point_in_time_copy)
	inuse=$(json_field "$json" in_use)
	if [ "$copy" = lvm ] && [ -z "$inuse" ]; then
		pass "$name" "point_in_time_copy \"lvm\", not in use"
	elif [ "$copy" = lvm ]; then
		fail "$name" "read from an LVM snapshot, yet recorded as in use: \"$inuse\""
	else
		fail "$name" "point_in_time_copy is \"$copy\", want \"lvm\""
	fi
}

check_no_leftover() {
	local left
	left=$(leftovers)
	if [ -z "$left" ]; then
		pass "$1" "no sauve-snap-* volume left"
	else
		fail "$1" "snapshot volumes left: $left"
		lvs -a "$VG" | sed 's/^/    | /'
	fi
}

step_env() {
	say "kernel $(uname -r); $(lvm version | head -n1 | tr -s ' ')"
	lsmod | grep -E '^dm_(mod|snapshot|thin_pool|bufio|persistent_data)' | sed 's/^/    | /'
	local targets
	targets=$(dmsetup targets)
	echo "$targets" | sed 's/^/    | /'
	if echo "$targets" | grep -q '^snapshot' && echo "$targets" | grep -q '^thin-pool'; then
		pass env "device-mapper with snapshot and thin-pool targets"
	else
		fail env "device-mapper targets snapshot and thin-pool missing"
		return 1
	fi
}

step_lvm_setup() {
	{
		run pvcreate -q /dev/vdb &&
			run vgcreate -q "$VG" /dev/vdb &&
			run lvcreate -q -y -L 768M -n work "$VG" &&
			run mkfs.ext4 -q "/dev/$VG/work" &&
			mkdir -p /w && mount "/dev/$VG/work" /w &&
			run lvcreate -q -y -L 128M -n thick "$VG" &&
			run mkfs.ext4 -q "/dev/$VG/thick" &&
			mkdir -p /mnt/thick && mount "/dev/$VG/thick" /mnt/thick &&
			run lvcreate -q -y -L 192M -T "$VG/pool" &&
			run lvcreate -q -y -V 64M -T "$VG/pool" -n thin &&
			run lvcreate -q -y -L 256M -n cow "$VG"
	} >/w-setup.log 2>&1 || {
		show /w-setup.log
		fail lvm-setup "could not make the volume group (log above)"
		return 1
	}
	mkdir -p /mnt/thick/files/sub
	for i in $(seq 1 12); do
		head -c $((i * 37 * 1024)) /dev/urandom >"/mnt/thick/files/f$i"
	done
	seq 1 50000 >/mnt/thick/files/sub/numbers.txt
	(cd /mnt/thick/files && sha256sum f* sub/*) >/w/thick.sums
	sync
	lvs -a -o lv_name,lv_attr,lv_size,pool_lv,origin "$VG" | sed 's/^/    | /'
	pass lvm-setup "PV /dev/vdb, VG $VG: thick ext4 LV with files, thin pool + thin LV, raw LV"
}

step_init() {
	if timeout 120 sauve init >/w/init.out 2>&1; then
		pass init "$(head -n1 /w/init.out)"
	else
		show /w/init.out
		fail init "sauve init failed"
		return 1
	fi
}

# step_thick backs up the mounted ext4 LV while the writer writes a file
# on it, restores it and checks the files and the writer's file.
step_thick() {
	local blocks=2048 last id
	start_writer /mnt/thick/seq.dat $blocks -stride $STRIDE || { fail thick-backup "writer did not start"; return; }
	backup thick "/dev/$VG/thick"
	local rc=$?
	sleep 1
	last=$(stop_writer)
	say "writer on /mnt/thick/seq.dat: last write $last"
	[ $rc -eq 0 ] || { fail thick-backup "sauve backup exit $rc"; return; }
	pass thick-backup "exit 0"
	check_lvm_copy thick-copy /w/thick.json
	check_no_leftover thick-cleanup
	id=$(json_field /w/thick.json snapshot)
	say "+ sauve restore latest /w/thick.img"
	timeout 600 sauve restore latest /w/thick.img >/w/thick-restore.out 2>&1 || {
		show /w/thick-restore.out
		fail thick-restore "sauve restore failed"
		return
	}
	say "  restored $(stat -c %s /w/thick.img) bytes (snapshot ${id:0:8})"
	mkdir -p /mnt/r
	mount -o ro,loop /w/thick.img /mnt/r 2>/w/mount.err || mount -o ro,noload,loop /w/thick.img /mnt/r 2>>/w/mount.err || {
		show /w/mount.err
		fail thick-restore "restored image does not mount as ext4"
		return
	}
	if (cd /mnt/r/files && sha256sum --quiet -c /w/thick.sums) >/w/sums.out 2>&1; then
		pass thick-files "$(wc -l </w/thick.sums) files match"
	else
		show /w/sums.out
		fail thick-files "restored files differ"
	fi
	check_cut thick-consistent /mnt/r/seq.dat $blocks "$last"
	umount /mnt/r
}

# step_thin backs up the thin LV while the writer writes its blocks.
step_thin() {
	local blocks=4096 last id
	start_writer "/dev/$VG/thin" $blocks -stride $STRIDE || { fail thin-backup "writer did not start"; return; }
	backup thin "/dev/$VG/thin"
	local rc=$?
	sleep 1
	# The control: the same volume read directly while the writer goes on.
	dd if="/dev/$VG/thin" of=/w/raced.img bs=4096 count=$blocks iflag=direct status=none
	last=$(stop_writer)
	say "writer on /dev/$VG/thin: last write $last"
	[ $rc -eq 0 ] || { fail thin-backup "sauve backup exit $rc"; return; }
	pass thin-backup "exit 0"
	check_lvm_copy thin-copy /w/thin.json
	check_no_leftover thin-cleanup
	id=$(json_field /w/thin.json snapshot)
	say "+ sauve restore ${id:0:8} /w/thin.img"
	timeout 600 sauve restore "$id" /w/thin.img >/w/thin-restore.out 2>&1 || {
		show /w/thin-restore.out
		fail thin-restore "sauve restore failed"
		return
	}
	check_cut thin-consistent /w/thin.img $blocks "$last"
	# The checker finds torn images: a deliberately torn copy of the
	# restored one, and (most likely) the direct read above.
	cp /w/thin.img /w/torn.img
	seqblk tear -blocks $blocks -stride $STRIDE /w/torn.img | sed 's/^/    | /'
	if seqblk check -blocks $blocks -stride $STRIDE /w/torn.img >/w/torn.out 2>&1; then
		show /w/torn.out
		fail checker-torn "the checker passed a deliberately torn image"
	else
		pass checker-torn "deliberately torn image: $(tail -n1 /w/torn.out | sed 's/^seqblk: //')"
	fi
	if seqblk check -blocks $blocks -stride $STRIDE /w/raced.img >/w/raced.out 2>&1; then
		say "note: a direct read racing the writer happened to be consistent: $(tail -n1 /w/raced.out)"
	else
		say "control: a direct read racing the writer is torn, as expected: $(grep '^cut=' /w/raced.out)"
	fi
}

# wait_snapshot PID: waits until sauve (PID) has made its snapshot
# volume and prints its name; prints nothing if sauve ended first.
wait_snapshot() {
	local left
	for _ in $(seq 1200); do
		left=$(leftovers)
		[ -n "$left" ] && { echo "$left"; return; }
		kill -0 "$1" 2>/dev/null || return
		sleep 0.1
	done
}

# step_overflow: a snapshot too small for what is written during the
# backup fills up, and the backup fails with nothing stored.
step_overflow() {
	local before after rc pid snap
	# Fill the volume first, so that reading it takes a while.
	seqblk write -blocks 65536 -stride 1 -bs 1048576 -max 65536 "/dev/$VG/cow" >/dev/null || { fail overflow "could not fill /dev/$VG/cow"; return; }
	before=$(snapshot_count)
	say "+ sauve backup /dev/$VG/cow --snapshot-size 8M --json &"
	sauve backup "/dev/$VG/cow" --snapshot-size 8M --json >/w/overflow.json 2>/w/overflow.err &
	pid=$!
	snap=$(wait_snapshot $pid)
	if [ -n "$snap" ]; then
		# 64 MiB of zeros, then 64 MiB of writes, over the snapshot's 8.
		say "snapshot $snap made; writing 64 MiB to /dev/$VG/cow"
		seqblk write -blocks 16384 -stride 1 -bs 1048576 -max 16384 "/dev/$VG/cow" | sed 's/^/    | writer: /'
	else
		say "no snapshot volume seen while sauve ran"
	fi
	wait $pid
	rc=$?
	say "  exit $rc"
	show /w/overflow.err
	after=$(snapshot_count)
	if [ $rc -eq 0 ]; then
		fail overflow-fails "backup with an 8M snapshot under 64M of writes succeeded"
	else
		pass overflow-fails "exit $rc"
	fi
	if grep -q 'filled its COW space' /w/overflow.err; then
		pass overflow-message "says the snapshot filled its COW space"
	else
		fail overflow-message "the error does not say that the snapshot filled its COW space"
	fi
	if [ "$before" = "$after" ]; then
		pass overflow-nothing-stored "snapshots still $after"
	else
		fail overflow-nothing-stored "snapshots went from $before to $after: a failed backup stored one"
	fi
	check_no_leftover overflow-cleanup
}

# step_kill kills sauve while its snapshot exists; the next backup
# removes the leftover.
step_kill() {
	local pid left rc
	say "+ sauve backup /dev/$VG/cow --snapshot-size 300M & (to be killed)"
	sauve backup "/dev/$VG/cow" --snapshot-size 300M >/w/killed.out 2>&1 &
	pid=$!
	left=$(wait_snapshot $pid)
	if [ -z "$left" ]; then
		wait $pid
		show /w/killed.out
		fail kill-leftover "no sauve-snap-* volume seen while sauve ran"
		return
	fi
	sleep 0.5
	kill -9 $pid
	wait $pid 2>/dev/null
	say "killed sauve (pid $pid) with snapshot $left"
	left=$(leftovers)
	say "after kill -9: left over: ${left:-none}"
	[ -n "$left" ] || { fail kill-leftover "the snapshot was gone after kill -9 (nothing to clean up)"; return; }
	pass kill-leftover "kill -9 left $left"
	backup afterkill "/dev/$VG/cow" --snapshot-size 300M
	rc=$?
	if [ $rc -eq 0 ]; then
		pass kill-next-backup "exit 0"
	else
		fail kill-next-backup "backup after kill -9 exit $rc"
	fi
	if grep -q "$left" /w/afterkill.err && grep -qi 'remov' /w/afterkill.err; then
		pass kill-warning "the next backup said it removed $left"
	else
		fail kill-warning "the next backup did not say it removed $left"
	fi
	check_no_leftover kill-cleanup
}

# step_not_lv: --snapshot lvm of a loop device is refused clearly.
step_not_lv() {
	local loop rc s
	# What earlier steps wrote is flushed first, so that the time the
	# refusal takes is sauve's own.
	s=$(date +%s%N)
	sync
	say "sync took $(( ($(date +%s%N) - s) / 1000000 )) ms"
	truncate -s 64M /w/plain.img
	loop=$(losetup -f --show /w/plain.img) || { fail not-lv "losetup failed"; return; }
	backup notlv "$loop" --snapshot lvm
	rc=$?
	losetup -d "$loop"
	if [ $rc -eq 0 ]; then
		fail not-lv "--snapshot lvm of $loop succeeded"
	elif [ "$(grep -c 'error' /w/notlv.err)" -ne 1 ] || ! grep -i 'error' /w/notlv.err | grep -qiE 'lvm|logical volume'; then
		fail not-lv "the error does not say, in one line, that $loop is no logical volume"
	else
		pass not-lv "$(grep -i error /w/notlv.err)"
	fi
}

say "sauve guest test: $(sauve version 2>/dev/null || sauve --version 2>/dev/null | head -n1)"
if step_env && step_lvm_setup && step_init; then
	step_thick
	step_thin
	step_overflow
	step_kill
	step_not_lv
	say "snapshots in the repository:"
	sauve snapshots 2>&1 | sed 's/^/    | /'
	lvs -a "$VG" 2>&1 | sed 's/^/    | /'
fi
umount /mnt/thick /w 2>/dev/null
result
