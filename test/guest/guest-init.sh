#!/bin/sh
# PID 1 of the sauve test guest (kernel command line init=/guest-init.sh):
# no systemd, only what the test needs. It mounts the kernel file
# systems, loads the device-mapper modules, mounts the payload disk
# (/dev/vdc, made fresh for every run by run.sh) and runs its test
# script, then powers off. Whatever happens, the machine powers off.
#
# The script is guest-test.sh (the LVM test), or the one that
# sauve.script=NAME on the kernel command line names (run.sh sets it
# from $SAUVE_GUEST_SCRIPT).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
# The initramfs has moved its own mounts here already.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
echo "guest-init: kernel $(uname -r), $(nproc) cpus"
for m in dm-mod dm-snapshot dm-thin-pool loop virtio_blk; do
	modprobe "$m" || echo "guest-init: modprobe $m failed"
done
script=guest-test.sh
for arg in $(cat /proc/cmdline); do
	case $arg in
	sauve.script=*) script=${arg#sauve.script=} ;;
	esac
done
mkdir -p /t
if mount -o ro /dev/vdc /t && [ -x "/t/$script" ]; then
	"/t/$script"
	echo "guest-init: test script exited $?"
else
	echo "SAUVE-GUEST-RESULT: FAIL (no payload disk /dev/vdc with $script)"
fi
sync
echo o >/proc/sysrq-trigger
sleep 60
