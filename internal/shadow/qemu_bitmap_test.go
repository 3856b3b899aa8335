package shadow

import (
	"reflect"
	"testing"
	"time"
)

func TestChangesSince(t *testing.T) {
	g := func(name string, consistent bool) qBitmap {
		return qBitmap{Name: name, Persistent: true, Inconsistent: !consistent}
	}
	const (
		a = "sauve-0000000000000001-aaaaaaaa"
		b = "sauve-0000000000000002-bbbbbbbb-aaaaaaaa"
		c = "sauve-0000000000000003-cccccccc-bbbbbbbb"
		x = "sauve-0000000000000003-dddddddd-99999999" // follows a generation that is gone
	)
	for _, tc := range []struct {
		name     string
		bitmaps  []qBitmap
		tracker  string
		merge    []string
		fullRead string
	}{
		{"one", []qBitmap{g(a, true)}, TrackerPrefix + a, []string{a}, ""},
		{"after failed backups", []qBitmap{g(c, true), g(a, true), g(b, true)}, TrackerPrefix + a, []string{a, b, c}, ""},
		{"from the middle", []qBitmap{g(a, false), g(b, true), g(c, true)}, TrackerPrefix + b, []string{b, c}, ""},
		{"no earlier backup", []qBitmap{g(a, true)}, "", nil, "no earlier backup of d0 through this VM"},
		{"missing", []qBitmap{g(b, true)}, TrackerPrefix + a, nil, "bitmap " + a + " is missing from d0 (QEMU stopped before saving it, it was removed, or the image was replaced)"},
		{"inconsistent", []qBitmap{g(a, false)}, TrackerPrefix + a, nil, "bitmap " + a + " of d0 is inconsistent (QEMU stopped uncleanly)"},
		{"a later one inconsistent", []qBitmap{g(a, true), g(b, false)}, TrackerPrefix + a, nil, "bitmap " + b + " of d0 is inconsistent (QEMU stopped uncleanly)"},
		{"a gap", []qBitmap{g(a, true), g(x, true)}, TrackerPrefix + a, nil, "bitmap " + x + " of d0 does not follow " + a + ": a bitmap between them is missing (removed?)"},
		{"not ours", []qBitmap{g("sauve-a", true)}, TrackerPrefix + "sauve-a", nil, "the earlier backup of d0 was not tracked by a sauve dirty bitmap (qemu-bitmap:sauve-a)"},
		{"other tracker", nil, "lvm-thin:42", nil, "the earlier backup of d0 was not tracked by a sauve dirty bitmap (lvm-thin:42)"},
		// A non-persistent bitmap of that name is not one of sauve's.
		{"not persistent", []qBitmap{{Name: a}}, TrackerPrefix + a, nil, "bitmap " + a + " is missing from d0 (QEMU stopped before saving it, it was removed, or the image was replaced)"},
	} {
		merge, fullRead := changesSince(generations(tc.bitmaps), tc.tracker, "d0")
		if !reflect.DeepEqual(merge, tc.merge) || fullRead != tc.fullRead {
			t.Errorf("%s: merge %v, full read %q; want %v, %q", tc.name, merge, fullRead, tc.merge, tc.fullRead)
		}
	}
}

// A new generation sorts after every existing one, even when the clock
// went back, and names the one before it.
func TestNewGeneration(t *testing.T) {
	now := time.Unix(1700000000, 0)
	first, err := newGeneration(now, nil)
	if err != nil {
		t.Fatal(err)
	}
	gens := generations([]qBitmap{{Name: first, Persistent: true}})
	if len(gens) != 1 || gens[0].prev != "" {
		t.Fatalf("first generation %q parsed as %+v", first, gens)
	}
	second, _ := newGeneration(now.Add(-time.Hour), gens)
	gens = generations([]qBitmap{{Name: second, Persistent: true}, {Name: first, Persistent: true}})
	if len(gens) != 2 || gens[1].name != second || gens[1].prev != gens[0].id {
		t.Errorf("second generation %q after %q: %+v", second, first, gens)
	}
	if merge, why := changesSince(gens, TrackerPrefix+first, "d0"); len(merge) != 2 || why != "" {
		t.Errorf("chain %v, %q", merge, why)
	}
}

func TestObjOwner(t *testing.T) {
	for name, want := range map[string]int{
		objName(1234, 0, kindFleece):      1234,
		"sauve-P77-nbd":                   77,
		"sauve-P-0f":                      0,
		"sauve-P12x-0f":                   0,
		"sauve-0000000000000001-aaaaaaaa": 0,
		"drive0":                          0,
		"sauve-P99999999999-0f":           0,
	} {
		if got := objOwner(name); got != want {
			t.Errorf("objOwner(%q) = %d, want %d", name, got, want)
		}
	}
}
