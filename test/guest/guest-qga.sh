#!/bin/bash
# The guest's side of the guest-freeze test (TestGuestAgentFreezeInGuest
# in cmd/sauve/guest_qga_test.go boots the guest through run.sh with
# SAUVE_GUEST_SCRIPT=guest-qga.sh): the host backs the VM up with sauve
# through QMP and the guest agent, and this script gives it something to
# freeze. It mounts the data drive (the virtio disk of serial
# sauve-data, ext4), runs seqfile writing files into it without end, and
# starts qemu-ga on the virtio-serial port named org.qemu.guest_agent.0
# (no udev here: the port is found in /sys/class/virtio-ports). Then it
# prints "SAUVE-QGA-READY" and answers the host's commands, one a line
# on the console (its standard input), with a line "CTL <command> ...":
#
#   status     CTL status seq=S qga=running|stopped: S is the writer's last
#              file (a tmpfs file, so it reads while the data is frozen)
#   qga-stop   stops qemu-ga (the VM's agent channel stays, nobody answers)
#   qga-start  starts it again
#   finish     stops the writer, checks its files and the filesystem
#              (e2fsck -fn) once unmounted, prints the result and ends
#
#
# When the payload has an agent/ directory (TestSauveAgentInGuest puts
# one there: agent.key, authorized), the guest's agent is sauve's own
# instead: "sauve agent run --serial" on the port named
# org.sauve.agent.0, freezing /data, its state and JSON-lines log in
# /run; qemu-ga does not run. Then "status" says agent=running|stopped
# and the commands are:
#
#   agent-kill   kill -9 the agent (its thaw guard must thaw /data)
#   agent-start  starts it again
#   agent-log    CTL agent-log N LINE: the agent's log's last line
#                (N lines in all)
#
# Nothing here writes to a disk but the writer: the freeze stops every
# filesystem of the guest, so state and logs live in /run (a tmpfs,
# which qemu-ga does not freeze).
set -u
export PATH=/t:/usr/sbin:/usr/bin:/sbin:/bin
AGENT_PORT=org.qemu.guest_agent.0
agent=qemu-ga
if [ -d /t/agent ]; then
	AGENT_PORT=org.sauve.agent.0
	agent=sauve
fi
DATA_SERIAL=sauve-data
# say, pass, fail, show, result.
. /t/steps.sh

# sysdev CLASS_GLOB FILE VALUE: the device under /dev of the entry of
# CLASS_GLOB whose FILE holds VALUE (within 10 s: devices come up late).
sysdev() {
	local d
	for _ in $(seq 100); do
		for d in $1; do
			if [ "$(cat "$d/$2" 2>/dev/null)" = "$3" ] && [ -e "/dev/${d##*/}" ]; then
				echo "/dev/${d##*/}"
				return 0
			fi
		done
		sleep 0.1
	done
	return 1
}

qga_running() { [ -s /run/qga.pid ] && kill -0 "$(cat /run/qga.pid)" 2>/dev/null; }

start_qga() {
	rm -f /run/qga.pid
	mkdir -p /run/qga
	qemu-ga -d -m virtio-serial -p "$port" -t /run/qga -f /run/qga.pid -l /run/qga.log
	for _ in $(seq 100); do
		qga_running && return 0
		sleep 0.1
	done
	say "qemu-ga did not start:"
	show /run/qga.log
	return 1
}

stop_qga() {
	qga_running || return 0
	kill "$(cat /run/qga.pid)"
	for _ in $(seq 100); do
		qga_running || return 0
		sleep 0.1
	done
	return 1
}

sauve_running() { [ -s /run/sauve-agent.pid ] && kill -0 "$(cat /run/sauve-agent.pid)" 2>/dev/null; }

start_sauve() {
	sauve agent run --serial "$port" --mount /data --key /t/agent/agent.key --authorized /t/agent/authorized \
		--state /run/sauve-agent.state --log /run/sauve-agent.log --window 10s >>/run/sauve-agent.out 2>&1 &
	local pid=$!
	echo $pid >/run/sauve-agent.pid
	for _ in $(seq 100); do
		grep -q "\"msg\":\"start\".*\"pid\":$pid[,}]" /run/sauve-agent.log 2>/dev/null && return 0
		sauve_running || break
		sleep 0.1
	done
	say "sauve agent did not start:"
	show /run/sauve-agent.out
	show /run/sauve-agent.log
	return 1
}

stop_sauve() {
	sauve_running || return 0
	kill "$(cat /run/sauve-agent.pid)"
	for _ in $(seq 100); do
		sauve_running || return 0
		sleep 0.1
	done
	return 1
}

agent_running() { if [ $agent = sauve ]; then sauve_running; else qga_running; fi; }
start_agent() { if [ $agent = sauve ]; then start_sauve; else start_qga; fi; }
stop_agent() { if [ $agent = sauve ]; then stop_sauve; else stop_qga; fi; }

seq_now() { cat /run/seqfile.last 2>/dev/null || echo 0; }

say "guest-qga: kernel $(uname -r)"
modprobe virtio_console || say "modprobe virtio_console failed"
port=$(sysdev '/sys/class/virtio-ports/*' name "$AGENT_PORT") || {
	fail setup "no virtio-serial port named $AGENT_PORT"
	result
	exit 1
}
data=$(sysdev '/sys/block/vd*' serial "$DATA_SERIAL") || {
	fail setup "no virtio disk of serial $DATA_SERIAL"
	result
	exit 1
}
mkdir -p /data
if ! mount -t ext4 "$data" /data; then
	fail setup "mount $data"
	result
	exit 1
fi
mkdir -p /data/w
seqfile write -keep 64 -pause 20ms -state /run/seqfile.last /data/w >/run/writer.out 2>&1 &
writer=$!
for _ in $(seq 100); do
	[ -s /run/seqfile.last ] && break
	sleep 0.1
done
if ! [ -s /run/seqfile.last ] || ! start_agent; then
	fail setup "the writer or $agent did not start"
	show /run/writer.out
	result
	exit 1
fi
pass setup "data $data on /data, writer at file $(seq_now), $agent on $port"
# The host's commands are not echoed back into the console.
stty -echo 2>/dev/null
echo "SAUVE-QGA-READY"

while read -r cmd; do
	cmd=${cmd%$'\r'}
	case $cmd in
	status)
		state=stopped
		agent_running && state=running
		if [ $agent = sauve ]; then
			echo "CTL status seq=$(seq_now) agent=$state"
		else
			echo "CTL status seq=$(seq_now) qga=$state"
		fi
		;;
	qga-stop)
		if stop_qga; then echo "CTL qga-stop done"; else echo "CTL qga-stop failed"; fi
		;;
	qga-start)
		if start_qga; then echo "CTL qga-start done"; else echo "CTL qga-start failed"; fi
		;;
	agent-kill)
		if sauve_running && kill -9 "$(cat /run/sauve-agent.pid)"; then
			echo "CTL agent-kill done at $(date +%s.%N)"
		else
			echo "CTL agent-kill failed"
		fi
		;;
	agent-start)
		if start_sauve; then echo "CTL agent-start done"; else echo "CTL agent-start failed"; fi
		;;
	agent-log)
		echo "CTL agent-log $(wc -l </run/sauve-agent.log) $(tail -n 1 /run/sauve-agent.log)"
		;;
	finish)
		echo "CTL finish"
		break
		;;
	"") ;;
	*) echo "CTL $cmd unknown" ;;
	esac
done

stop_agent
[ $agent = sauve ] && say "sauve agent's log: $(wc -l </run/sauve-agent.log) lines" && show /run/sauve-agent.log
kill -TERM "$writer"
wait "$writer"
say "writer: $(cat /run/writer.out)"
if out=$(seqfile check /data/w 2>&1); then
	pass live-files "$out"
else
	fail live-files "$out"
fi
umount /data
if out=$(e2fsck -fn "$data" 2>&1); then
	pass live-fsck "e2fsck -fn $data clean"
else
	fail live-fsck "e2fsck -fn $data: $(echo "$out" | tail -n 5)"
fi
result
