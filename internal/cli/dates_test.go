package cli

import (
	"testing"
	"time"
)

func TestParseWhen(t *testing.T) {
	loc, err := time.LoadLocation("Europe/Paris")
	if err != nil {
		t.Skip("no time zone data:", err)
	}
	saved := time.Local
	time.Local = loc
	defer func() { time.Local = saved }()
	now := time.Date(2026, 3, 31, 12, 0, 0, 0, loc)
	for _, c := range []struct {
		in   string
		want time.Time
	}{
		{"2026-11-30T14:00:00Z", time.Date(2026, 11, 30, 14, 0, 0, 0, time.UTC)},
		{"2026-11-30T14:00:00+01:00", time.Date(2026, 11, 30, 13, 0, 0, 0, time.UTC)},
		{"2026-11-30", time.Date(2026, 11, 30, 0, 0, 0, 0, loc)},
		{"2026-11-30 14:00", time.Date(2026, 11, 30, 14, 0, 0, 0, loc)},
		{"2026-07-01 14:00:05", time.Date(2026, 7, 1, 14, 0, 5, 0, loc)},
		{"2026-11-30T14:00", time.Date(2026, 11, 30, 14, 0, 0, 0, loc)},
		{"3d", time.Date(2026, 3, 28, 12, 0, 0, 0, loc)},
		{"2w", time.Date(2026, 3, 17, 12, 0, 0, 0, loc)},
		// Calendar months: 31 March less one month is 3 March (Go's
		// AddDate normalises 31 February), as restic counts.
		{"1m", time.Date(2026, 3, 3, 12, 0, 0, 0, loc)},
		{"1y2m3d", time.Date(2025, 1, 28, 12, 0, 0, 0, loc)},
		{"36h", now.Add(-36 * time.Hour)},
		{"90m0s", now.Add(-90 * time.Minute)},
	} {
		got, err := parseWhen(c.in, now)
		if err != nil {
			t.Errorf("parseWhen(%q): %v", c.in, err)
			continue
		}
		if !got.Equal(c.want) {
			t.Errorf("parseWhen(%q) = %v, want %v", c.in, got, c.want)
		}
	}
	for _, bad := range []string{"", "yesterday", "2026-13-01", "2026-11-30 25:00", "3x", "-3d", "-1h", "d"} {
		if got, err := parseWhen(bad, now); err == nil {
			t.Errorf("parseWhen(%q) = %v, want an error", bad, got)
		}
	}
}

func TestParseSpan(t *testing.T) {
	day := 24 * time.Hour
	for _, c := range []struct {
		in   string
		want time.Duration
	}{
		{"30d", 30 * day},
		{"2w", 14 * day},
		{"1m", 30 * day},
		{"1y", 365 * day},
		{"1y2m3d4h", (365+60+3)*day + 4*time.Hour},
		{"12h", 12 * time.Hour},
		{"36h", 36 * time.Hour},
		{"90m0s", 90 * time.Minute},
		{"1.5h", 90 * time.Minute},
	} {
		sp, err := parseSpan(c.in)
		if err != nil {
			t.Errorf("parseSpan(%q): %v", c.in, err)
			continue
		}
		if got := sp.duration(); got != c.want {
			t.Errorf("parseSpan(%q).duration() = %v, want %v", c.in, got, c.want)
		}
	}
	for _, bad := range []string{"", "30", "3x", "-2d", "-1h", "d3", "99999999d"} {
		if sp, err := parseSpan(bad); err == nil {
			t.Errorf("parseSpan(%q) = %+v, want an error", bad, sp)
		}
	}
}

func TestFilterDates(t *testing.T) {
	f := filterFlags{before: "2026-11-30", after: "2026-12-01"}
	if _, err := f.filter(); err == nil {
		t.Fatal("--after later than --before accepted")
	}
	f = filterFlags{before: "2026-12-01", after: "2026-11-30"}
	flt, err := f.filter()
	if err != nil {
		t.Fatal(err)
	}
	if !flt.After.Before(flt.Before) || flt.Before.Sub(flt.After) != 24*time.Hour {
		t.Fatalf("filter %v .. %v", flt.After, flt.Before)
	}
}
