# Sourced by the guest's test scripts (guest-test.sh, guest-qga.sh): how
# a step says how it went. Every step prints "[Ns] STEP <name>: PASS" or
# "[Ns] STEP <name>: FAIL: why" (which TestLVMInGuest and
# TestGuestAgentFreezeInGuest quote when they fail), and result prints
# the last line, "SAUVE-GUEST-RESULT: PASS" or "SAUVE-GUEST-RESULT: FAIL
# (steps)", which run.sh looks for.
failed=()
passed=0
t0=$(date +%s)

say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
pass() { say "STEP $1: PASS${2:+ ($2)}"; passed=$((passed + 1)); }
fail() { say "STEP $1: FAIL: $2"; failed+=("$1"); }
# show prints a file's lines indented, at most 40.
show() { [ -s "$1" ] && sed -n '1,40s/^/    | /p' "$1"; return 0; }

result() {
	say "$passed steps passed, ${#failed[@]} failed"
	if [ ${#failed[@]} -eq 0 ]; then
		echo "SAUVE-GUEST-RESULT: PASS"
	else
		echo "SAUVE-GUEST-RESULT: FAIL (${failed[*]})"
	fi
}
