#!/bin/sh
# The guest's side of the instant-boot test (TestInstantBootInGuest in
# cmd/sauve/guest_boot_test.go): the guest's root disk is a writable NBD
# export of a snapshot of it, served by 'sauve serve nbd --writable'. It
# writes a marker and 8 MiB of random bytes onto the root filesystem,
# syncs, drops the page cache, reads them back and prints the result; the
# host then finds them in the overlay and not in the repository.
set -u
fail() { echo "SAUVE-GUEST-RESULT: FAIL ($*)"; exit 1; }
echo "SAUVE INSTANT BOOT $(uname -r)" > /instant-boot-proof || fail "write the marker"
mkdir -p /var/lib/instant || fail "mkdir"
dd if=/dev/urandom of=/var/lib/instant/blob bs=1M count=8 2>/dev/null || fail "write the blob"
sha256sum /var/lib/instant/blob > /instant-boot-sha || fail "hash the blob"
sync
echo 3 > /proc/sys/vm/drop_caches
sha256sum -c /instant-boot-sha || fail "the blob read back differs"
grep -q "SAUVE INSTANT BOOT" /instant-boot-proof || fail "the marker read back differs"
sync
echo "SAUVE-GUEST-RESULT: PASS"
