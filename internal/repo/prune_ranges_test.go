package repo

import "testing"

// Needed blobs close together share a read (streamed, so a range costs
// no memory), within rangeMax; overlapping blobs never share one.
func TestNeededRanges(t *testing.T) {
	const mib = 1 << 20
	blob := func(off, n int64) Copy {
		return Copy{Location: Location{Offset: uint32(off), Length: uint32(n)}}
	}
	tests := []struct {
		name  string
		blobs []Copy
		need  []bool
		want  [][2]int64 // start, end of each range
	}{
		{"adjacent, one read", []Copy{blob(0, mib), blob(mib, mib)}, []bool{true, true}, [][2]int64{{0, 2 * mib}}},
		{"gap over 1 MiB", []Copy{blob(0, mib), blob(3*mib, mib)}, []bool{true, true}, [][2]int64{{0, mib}, {3 * mib, 4 * mib}}},
		{"unneeded skipped", []Copy{blob(0, mib), blob(mib, 5*mib), blob(6*mib, mib)}, []bool{true, false, true}, [][2]int64{{0, mib}, {6 * mib, 7 * mib}}},
		{"a whole used pack, one read", []Copy{blob(0, 3*mib), blob(3*mib, 3*mib), blob(6*mib, 3*mib), blob(9*mib, 3*mib)}, []bool{true, true, true, true},
			[][2]int64{{0, 12 * mib}}},
		{"capped at 64 MiB", []Copy{blob(0, 40*mib), blob(40*mib, 30*mib)}, []bool{true, true}, [][2]int64{{0, 40 * mib}, {40 * mib, 70 * mib}}},
		{"one blob over the cap", []Copy{blob(0, 70*mib), blob(70*mib, mib)}, []bool{true, true}, [][2]int64{{0, 70 * mib}, {70 * mib, 71 * mib}}},
		{"overlapping blobs, own ranges", []Copy{blob(0, 2*mib), blob(mib, 2*mib)}, []bool{true, true}, [][2]int64{{0, 2 * mib}, {mib, 3 * mib}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := neededRanges(&packUse{blobs: tc.blobs, need: tc.need})
			if len(got) != len(tc.want) {
				t.Fatalf("%d ranges, want %d: %+v", len(got), len(tc.want), got)
			}
			for i, rg := range got {
				if rg.start != tc.want[i][0] || rg.end != tc.want[i][1] {
					t.Errorf("range %d: [%d, %d), want [%d, %d)", i, rg.start, rg.end, tc.want[i][0], tc.want[i][1])
				}
			}
		})
	}
}
