package migrate

import (
	"os"
	"path/filepath"
	"testing"
)

// A state written before the header had a tracker and a VM drive's
// identity (testdata/state-before-tracker.state, as sauve wrote it) still
// loads, without a tracker; the tracker and a VM drive's identity are
// kept across a compaction and a reload.
func TestStateTrackerAndVMIdentity(t *testing.T) {
	b, err := os.ReadFile("testdata/state-before-tracker.state")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "s")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := Load(path)
	if err != nil {
		t.Fatalf("a state of an earlier sauve: %v", err)
	}
	if h := st.Header; h.Tracker != "" || h.Passes != 2 || h.Source.Device != "253:4" || h.Source.VM != "" || st.Hashes()[2] != (Hash{3}) {
		t.Fatalf("old state read as %+v", h)
	}
	vm := Identity{Path: "qemu:7a1c/drive0", Size: st.Header.Source.Size, VM: "7a1c", Drive: "drive0", DiskID: "d"}
	st.Header.Source = vm
	st.Header.Tracker = "qemu-bitmap:sauve-0000000000000001-0a0b0c0d"
	if err := st.Compact(); err != nil {
		t.Fatal(err)
	}
	st.Close()
	st, err = Load(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if h := st.Header; h.Tracker != "qemu-bitmap:sauve-0000000000000001-0a0b0c0d" || h.Source.Mismatch(vm) != "" {
		t.Errorf("reloaded header %+v", h)
	}
	for _, other := range []Identity{
		{Path: vm.Path, Size: vm.Size, VM: "name=vm2", Drive: "drive0", DiskID: "d"},
		{Path: vm.Path, Size: vm.Size, VM: "7a1c", Drive: "drive1", DiskID: "d"},
		{Path: vm.Path, Size: vm.Size, DiskID: "d"},
	} {
		if vm.Mismatch(other) == "" {
			t.Errorf("%+v taken for %+v", other, vm)
		}
	}
}
