package resize

import (
	"bytes"
	"os"
	"testing"

	"github.com/sauve-backup/sauve/internal/extent"
)

// TestOverlay checks that streaming a disk through Overlay gives the
// same bytes as patching it in place, and that the map covers every
// patch.
func TestOverlay(t *testing.T) {
	needTools(t, "sfdisk")
	for _, grow := range []bool{false, true} {
		path := makeDisk(t, 20*mib, "label: gpt\n,4M\n,\n")
		orig, _ := os.ReadFile(path)
		// A map of only the first MiB: the patches past it must be added.
		m := firstMiB{}
		res, err := Plan(bytes.NewReader(orig), 20*mib, 64*mib, Options{GrowLastPartition: grow})
		if err != nil {
			t.Fatal(err)
		}
		r, om := Overlay(bytes.NewReader(orig), m, 20*mib, res.Patches)
		got := make([]byte, 64*mib)
		const window = 1 << 18
		for off := int64(0); off < 64*mib; off += window {
			rs, err := om.Data(off, window)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := extent.ReadRanges(r, got[off:off+window], off, rs); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := grow2(t, path, 64*mib, grow); err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(path)
		// Only the mapped bytes were copied: compare those, that is the
		// first MiB and the patches.
		for _, p := range res.Patches {
			if !bytes.Equal(got[p.Off:p.Off+int64(len(p.Data))], want[p.Off:p.Off+int64(len(p.Data))]) {
				t.Errorf("grow %v: patch at %d differs", grow, p.Off)
			}
		}
		if !bytes.Equal(got[:mib], want[:mib]) {
			t.Errorf("grow %v: first MiB differs", grow)
		}
	}
}

// firstMiB maps the first MiB of a disk as data, the rest as zeros.
type firstMiB struct{}

func (firstMiB) Data(off, n int64) ([]extent.Range, error) {
	if off >= mib {
		return nil, nil
	}
	return []extent.Range{{Start: off, End: min(off+n, mib)}}, nil
}

func grow2(t *testing.T, path string, size int64, g bool) (*Result, error) {
	return grow(t, path, size, Options{GrowLastPartition: g})
}
