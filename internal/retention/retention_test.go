package retention

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
	_ "time/tzdata" // Europe/Paris in any test environment
)

// series makes one snapshot of host h, source /dev/vda, every step from
// start, n of them, IDs s00, s01 ... oldest first.
func series(h string, start time.Time, step time.Duration, n int) []Snapshot {
	var out []Snapshot
	for i := range n {
		out = append(out, Snapshot{ID: fmt.Sprintf("%s%02d", h, i), Time: start.Add(time.Duration(i) * step), Host: h, Sources: []string{"/dev/vda"}})
	}
	return out
}

func kept(ds []Decision) string {
	var ids []string
	for _, d := range ds {
		if d.Keep {
			ids = append(ids, d.Snapshot.ID)
		}
	}
	return strings.Join(ids, " ")
}

func TestApply(t *testing.T) {
	day0 := time.Date(2026, 11, 1, 23, 30, 0, 0, time.UTC)
	daily := series("a", day0, 24*time.Hour, 40)    // a00 (Nov 1) .. a39 (Dec 10)
	hourly := series("b", day0, 20*time.Minute, 10) // b00 .. b09, 23:30 to 02:30
	for _, tc := range []struct {
		name  string
		snaps []Snapshot
		p     Policy
		want  string
	}{
		{"keep-last 3: the img_1/2/3 rotation", daily, Policy{Last: 3}, "a39 a38 a37"},
		{"daily 5", daily, Policy{Daily: 5}, "a39 a38 a37 a36 a35"},
		// ISO weeks: Dec 10 2026 is a Thursday of week 50 (Dec 7-13); the
		// newest of each of the 3 newest weeks: Dec 10, Sun Dec 6, Sun Nov 29.
		{"weekly 3", daily, Policy{Weekly: 3}, "a39 a35 a28"},
		{"monthly 2", daily, Policy{Monthly: 2}, "a39 a29"},
		{"yearly 5: one year only", daily, Policy{Yearly: 5}, "a39"},
		{"last 1 + monthly 2 overlap", daily, Policy{Last: 1, Monthly: 2}, "a39 a29"},
		{"within 3 days of the newest", daily, Policy{Within: 72 * time.Hour}, "a39 a38 a37 a36"},
		// 20 min apart from 23:30: hour 23 holds b00 b01, 00 b02-b04, 01
		// b05-b07, 02 b08 b09; the newest of each hour is kept.
		{"hourly 3", hourly, Policy{Hourly: 3}, "b09 b07 b04"},
		{"daily across midnight", hourly, Policy{Daily: 2}, "b09 b01"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ds, err := Apply(tc.snaps, tc.p, DefaultGroupBy(), time.UTC)
			if err != nil {
				t.Fatal(err)
			}
			if got := kept(ds); got != tc.want {
				t.Errorf("kept %q, want %q", got, tc.want)
			}
			if len(ds) != len(tc.snaps) {
				t.Errorf("%d decisions for %d snapshots", len(ds), len(tc.snaps))
			}
			for _, d := range ds {
				if d.Keep != (len(d.Reasons) > 0) {
					t.Errorf("%s: keep %v with reasons %q", d.Snapshot.ID, d.Keep, d.Reasons)
				}
			}
		})
	}
}

// Each group is rotated on its own: host b's one snapshot is not pushed
// out by host a's many, nor a disk of another source by the other's.
func TestApplyGroups(t *testing.T) {
	day0 := time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)
	snaps := append(series("a", day0, time.Hour, 5), series("b", day0.Add(-time.Hour), time.Hour, 1)...)
	other := Snapshot{ID: "c", Time: day0, Host: "a", Sources: []string{"/dev/vdb"}}
	snaps = append(snaps, other)
	ds, err := Apply(snaps, Policy{Last: 2}, DefaultGroupBy(), time.UTC)
	if err != nil {
		t.Fatal(err)
	}
	if got := kept(ds); got != "a04 a03 b00 c" {
		t.Errorf("kept %q", got)
	}
	by, err := ParseGroupBy("")
	if err != nil {
		t.Fatal(err)
	}
	ds, _ = Apply(snaps, Policy{Last: 2}, by, time.UTC)
	if got := kept(ds); got != "a04 a03" {
		t.Errorf("one group for all: kept %q", got)
	}
}

// Tags keep what they mark; the order of the input does not change the
// outcome; the reasons say which rule kept each.
func TestApplyTagsOrderReasons(t *testing.T) {
	snaps := series("a", time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), 24*time.Hour, 10)
	snaps[2].Tags = []string{"keep", "x"}
	want := ""
	for i := range 20 {
		shuffled := append([]Snapshot(nil), snaps...)
		r := rand.New(rand.NewPCG(uint64(i), 7))
		r.Shuffle(len(shuffled), func(a, b int) { shuffled[a], shuffled[b] = shuffled[b], shuffled[a] })
		ds, err := Apply(shuffled, Policy{Last: 1, Tags: []string{"keep"}}, DefaultGroupBy(), time.UTC)
		if err != nil {
			t.Fatal(err)
		}
		got := kept(ds)
		if want == "" {
			want = got
		}
		if got != want || got != "a09 a02" {
			t.Fatalf("shuffle %d: kept %q, want a09 a02", i, got)
		}
		for _, d := range ds {
			switch d.Snapshot.ID {
			case "a09":
				if strings.Join(d.Reasons, ",") != "last 1/1" {
					t.Errorf("a09 reasons %q", d.Reasons)
				}
			case "a02":
				if strings.Join(d.Reasons, ",") != "tag keep" {
					t.Errorf("a02 reasons %q", d.Reasons)
				}
			}
		}
	}
}

// Days are the user's: a snapshot at 23:30 UTC is on the next day in
// Paris.
func TestApplyLocation(t *testing.T) {
	paris, err := time.LoadLocation("Europe/Paris")
	if err != nil {
		t.Skip("no time zone database:", err)
	}
	snaps := []Snapshot{
		{ID: "x", Time: time.Date(2026, 6, 1, 21, 0, 0, 0, time.UTC), Host: "h"},
		{ID: "y", Time: time.Date(2026, 6, 1, 22, 30, 0, 0, time.UTC), Host: "h"},
	}
	ds, _ := Apply(snaps, Policy{Daily: 2}, DefaultGroupBy(), time.UTC)
	if got := kept(ds); got != "y" {
		t.Errorf("UTC days: kept %q, want y (one day)", got)
	}
	ds, _ = Apply(snaps, Policy{Daily: 2}, DefaultGroupBy(), paris)
	if got := kept(ds); got != "y x" {
		t.Errorf("Paris days: kept %q, want y x (two days)", got)
	}
}

func TestApplyRefuses(t *testing.T) {
	snaps := series("a", time.Now(), time.Hour, 3)
	if _, err := Apply(snaps, Policy{}, DefaultGroupBy(), nil); !errors.Is(err, ErrNoRule) {
		t.Errorf("empty policy: %v", err)
	}
	if _, err := Apply(snaps, Policy{Last: -1}, DefaultGroupBy(), nil); err == nil || !strings.Contains(err.Error(), "--keep-last -1") {
		t.Errorf("negative count: %v", err)
	}
	if _, err := ParseGroupBy("host,colour"); err == nil || !strings.Contains(err.Error(), `"colour"`) {
		t.Errorf("bad --group-by: %v", err)
	}
	if ds, err := Apply(nil, Policy{Last: 1}, DefaultGroupBy(), nil); err != nil || len(ds) != 0 {
		t.Errorf("no snapshots: %v, %v", ds, err)
	}
}

// oracle keeps, for one group sorted newest first, what the rules keep,
// computed the plain way: for each calendar rule, walk from the newest and
// keep the first snapshot of each new local period until n periods are
// kept.
func oracle(snaps []Snapshot, p Policy, loc *time.Location) map[string]bool {
	keep := map[string]bool{}
	for i := 0; i < p.Last && i < len(snaps); i++ {
		keep[snaps[i].ID] = true
	}
	type key [4]int
	rules := []struct {
		n  int
		of func(t time.Time) key
	}{
		{p.Hourly, func(t time.Time) key { y, m, d := t.Date(); return key{y, int(m), d, t.Hour()} }},
		{p.Daily, func(t time.Time) key { y, m, d := t.Date(); return key{y, int(m), d} }},
		{p.Weekly, func(t time.Time) key { y, w := t.ISOWeek(); return key{y, w} }},
		{p.Monthly, func(t time.Time) key { return key{t.Year(), int(t.Month())} }},
		{p.Yearly, func(t time.Time) key { return key{t.Year()} }},
	}
	for _, r := range rules {
		seen := map[key]bool{}
		for _, sn := range snaps {
			if len(seen) >= r.n {
				break
			}
			if k := r.of(sn.Time.In(loc)); !seen[k] {
				seen[k] = true
				keep[sn.ID] = true
			}
		}
	}
	for _, sn := range snaps {
		if p.Within > 0 && snaps[0].Time.Sub(sn.Time) <= p.Within {
			keep[sn.ID] = true
		}
		for _, tag := range p.Tags {
			for _, t := range sn.Tags {
				if t == tag {
					keep[sn.ID] = true
				}
			}
		}
	}
	return keep
}

// TestApplyYear: a leap year (2024) of snapshots in Europe/Paris (two DST
// changes), three hosts backing up at different rates, two sources on one
// host, tags, and two snapshots with identical times; every policy's
// result equals the oracle's, whatever the input order.
func TestApplyYear(t *testing.T) {
	paris, err := time.LoadLocation("Europe/Paris")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(2024, 1))
	var snaps []Snapshot
	add := func(host, src string, t time.Time, tags ...string) {
		snaps = append(snaps, Snapshot{ID: fmt.Sprintf("%s-%s-%05d", host, src[5:], len(snaps)), Time: t, Host: host, Sources: []string{src}, Tags: tags})
	}
	start := time.Date(2024, 1, 1, 0, 0, 0, 0, paris)
	for d := 0; d < 366; d++ {
		day := start.AddDate(0, 0, d)
		// web1: nightly at 02:30 local (a time that does not exist on
		// 31 March and happens twice on 27 October).
		add("web1", "/dev/vda", day.Add(2*time.Hour+30*time.Minute), "nightly")
		// web1's second disk: every 6 hours.
		for h := 0; h < 24; h += 6 {
			add("web1", "/dev/vdb", day.Add(time.Duration(h)*time.Hour+time.Duration(rng.IntN(50))*time.Minute))
		}
		// db1: at random hours, some days twice, some days not at all.
		for n := rng.IntN(3); n > 0; n-- {
			tags := []string{}
			if day.Day() == 1 {
				tags = append(tags, "monthly")
			}
			add("db1", "/dev/sda", day.Add(time.Duration(rng.IntN(24*60))*time.Minute), tags...)
		}
	}
	// Both hours of the October change, and two snapshots at one instant.
	fallBack := time.Date(2024, 10, 27, 0, 30, 0, 0, time.UTC) // 02:30 CEST
	add("web2", "/dev/vda", fallBack)
	add("web2", "/dev/vda", fallBack.Add(time.Hour)) // 02:30 CET
	add("web2", "/dev/vda", fallBack.Add(2*time.Hour))
	add("web2", "/dev/vda", fallBack.Add(2*time.Hour)) // identical time
	add("web2", "/dev/vda", time.Date(2024, 2, 29, 23, 59, 0, 0, paris))
	add("web2", "/dev/vda", time.Date(2024, 3, 1, 0, 1, 0, 0, paris))

	policies := []Policy{
		{Last: 3},
		{Daily: 7, Weekly: 4, Monthly: 12, Yearly: 3},
		{Hourly: 30},
		{Daily: 400},
		{Weekly: 60},
		{Monthly: 6, Tags: []string{"monthly"}},
		{Within: 30 * 24 * time.Hour, Last: 1},
		{Last: 1000},
	}
	for _, p := range policies {
		t.Run(fmt.Sprintf("%+v", p), func(t *testing.T) {
			in := slices.Clone(snaps)
			rng.Shuffle(len(in), func(i, j int) { in[i], in[j] = in[j], in[i] })
			ds, err := Apply(in, p, DefaultGroupBy(), paris)
			if err != nil {
				t.Fatal(err)
			}
			groups := map[string][]Snapshot{}
			for _, sn := range snaps {
				k := sn.Host + " " + sn.Sources[0]
				groups[k] = append(groups[k], sn)
			}
			want := map[string]bool{}
			for _, g := range groups {
				slices.SortStableFunc(g, func(a, b Snapshot) int {
					if c := b.Time.Compare(a.Time); c != 0 {
						return c
					}
					return strings.Compare(a.ID, b.ID)
				})
				for id := range oracle(g, p, paris) {
					want[id] = true
				}
			}
			if len(ds) != len(snaps) {
				t.Fatalf("%d decisions for %d snapshots", len(ds), len(snaps))
			}
			for _, d := range ds {
				if d.Keep != want[d.Snapshot.ID] {
					t.Errorf("%s at %s: keep %v, oracle %v (reasons %q)", d.Snapshot.ID, d.Snapshot.Time.In(paris), d.Keep, want[d.Snapshot.ID], d.Reasons)
				}
			}
		})
	}

	// The edge cases, by hand: the two 02:30 of 27 October are one local
	// hour (as restic counts), the identical pair is broken by ID, and
	// 29 February is a day of its own.
	web2 := snaps[len(snaps)-6:]
	ds, _ := Apply(web2, Policy{Hourly: 2, Daily: 3}, DefaultGroupBy(), paris)
	got := map[string][]string{}
	for _, d := range ds {
		got[d.Snapshot.ID] = d.Reasons
	}
	ids := func(i int) string { return web2[i].ID }
	if r := got[ids(2)]; len(r) != 2 || r[0] != "hourly 2024-10-27 03h" {
		t.Errorf("newest of the identical pair (lower ID first): %q", r)
	}
	if r := got[ids(3)]; len(r) != 0 {
		t.Errorf("the other of the identical pair: %q", r)
	}
	if r := got[ids(1)]; len(r) != 1 || r[0] != "hourly 2024-10-27 02h" {
		t.Errorf("02:30 CET: %q", r)
	}
	if r := got[ids(0)]; len(r) != 0 {
		t.Errorf("02:30 CEST shares the local hour 02h with 02:30 CET: %q", r)
	}
	if r := got[ids(4)]; len(r) != 1 || r[0] != "daily 2024-02-29" {
		t.Errorf("29 February: %q", r)
	}
	if r := got[ids(5)]; len(r) != 1 || r[0] != "daily 2024-03-01" {
		t.Errorf("1 March: %q", r)
	}
}
