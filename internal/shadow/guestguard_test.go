package shadow

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// guestFreezerEnv makes the test binary a process that freezes the guest
// at the socket it names, under the guest's thaw guard, says "frozen" and
// waits to be killed: a sauve killed in the middle of a freeze.
const guestFreezerEnv = "SAUVE_TEST_GUEST_FREEZER"

func testGuestFreezer(socket string) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	times := qgaFast
	times.guard = []string{self, "thaw-guard"}
	if _, err := freezeGuest(context.Background(), socket, time.Minute, times); err != nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println("frozen")
	time.Sleep(time.Minute)
	return 0
}

// A sauve killed (kill -9) while the guest is frozen does not leave it
// frozen: its guard thaws it at once, long before the freeze timeout.
func TestGuestGuardThawsWhenSauveDies(t *testing.T) {
	a := startQGA(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), guestFreezerEnv+"="+a.sock)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "frozen" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the freezing process said %q", line)
	}
	wrote := a.write("during")
	select {
	case err := <-wrote:
		t.Fatalf("a write went through the freeze (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	killed := time.Now()
	cmd.Process.Kill()
	cmd.Wait()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("the guest was thawed %v after its freezer was killed (freeze timeout: 1 min)", time.Since(killed).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("the guest is still frozen 5 s after the process that froze it was killed: no guard thawed it")
	}
	if got := a.raw(t, "guest-fsfreeze-status"); !strings.Contains(got, `"thawed"`) {
		t.Errorf("status after the guard's thaw: %s", got)
	}
}

// With the guard, a freeze thawed by sauve ends the guard quietly: the
// guest is thawed once, and the next backup freezes as usual.
func TestGuestGuardQuietAfterThaw(t *testing.T) {
	a := startQGA(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	times := qgaFast
	times.guard = []string{self, "thaw-guard"}
	for i := range 2 {
		thaw, err := freezeGuest(context.Background(), a.sock, 10*time.Second, times)
		if err != nil {
			t.Fatalf("freeze %d: %v", i, err)
		}
		if _, err := thaw(); err != nil {
			t.Fatalf("thaw %d: %v", i, err)
		}
		if got := a.raw(t, "guest-fsfreeze-status"); !strings.Contains(got, `"thawed"`) {
			t.Errorf("status after thaw %d: %s", i, got)
		}
	}
	// A guard that is not sauve's is refused before anything is frozen.
	times.guard = []string{"/bin/echo"}
	if _, err := freezeGuest(context.Background(), a.sock, 10*time.Second, times); err == nil || !strings.Contains(err.Error(), "did not start") {
		t.Errorf("freeze with a broken guard: %v", err)
	}
	if got := a.raw(t, "guest-fsfreeze-status"); !strings.Contains(got, `"thawed"`) {
		t.Errorf("status after the refused guard: %s", got)
	}
}
