package resize

import (
	"bytes"
	"testing"
)

// FuzzPlan feeds Plan the first sectors of a disk (the rest reads as
// zeros): it must not panic, and every patch must lie on the new disk.
func FuzzPlan(f *testing.F) {
	f.Add([]byte{}, uint32(100), false)
	f.Fuzz(func(t *testing.T, head []byte, extra uint32, grow bool) {
		if len(head) > 1<<20 {
			return
		}
		oldSize := int64(max(len(head), 64<<10))
		disk := make([]byte, oldSize)
		copy(disk, head)
		newSize := oldSize + int64(extra)*512
		for _, ss := range []int{0, 4096} {
			res, err := Plan(bytes.NewReader(disk), oldSize, newSize, Options{GrowLastPartition: grow, SectorSize: ss})
			if err != nil {
				continue
			}
			for _, p := range res.Patches {
				if p.Off < 0 || p.Off+int64(len(p.Data)) > newSize {
					t.Fatalf("patch at %d+%d past the new disk of %d bytes", p.Off, len(p.Data), newSize)
				}
			}
		}
	})
}
