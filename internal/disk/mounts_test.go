package disk

import "testing"

func TestMountChain(t *testing.T) {
	m := Mount{Device: "/dev/loop2", Point: "/mnt", Via: []string{"/dev/loop1", "/dev/loop2"}}
	if got := m.Chain(); got != "/dev/loop1 → /dev/loop2" {
		t.Fatalf("Chain: %q", got)
	}
	m.Within = "/dev/loop0"
	if got := m.Chain(); got != "its disk /dev/loop0 → /dev/loop1 → /dev/loop2" {
		t.Fatalf("Chain: %q", got)
	}
}
