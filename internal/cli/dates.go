package cli

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// span is a length of time as people write it: calendar years, months
// and days, plus a fixed duration (hours and below).
type span struct {
	years, months, days int
	d                   time.Duration
}

// calendarSpan is restic's form: 1y2m3d4h, 2w ("m" is months, as there).
var calendarSpan = regexp.MustCompile(`^(?:[0-9]+[ymwdh])+$`)

var spanPart = regexp.MustCompile(`([0-9]+)([ymwdh])`)

// parseSpan reads "30d", "2w", "1y2m3d", "12h" (y years, m months, w
// weeks, d days, h hours, as restic writes them) or a Go duration
// ("90m0s", "1.5h", "36h"). Where the two forms disagree ("5m"), the
// restic form wins: m is months.
func parseSpan(s string) (span, error) {
	s = strings.TrimSpace(s)
	if calendarSpan.MatchString(s) {
		var sp span
		for _, m := range spanPart.FindAllStringSubmatch(s, -1) {
			n, err := strconv.Atoi(m[1])
			if err != nil || n > 1_000_000 {
				return span{}, fmt.Errorf("%q: %s is too large", s, m[1])
			}
			switch m[2] {
			case "y":
				sp.years += n
			case "m":
				sp.months += n
			case "w":
				sp.days += 7 * n
			case "d":
				sp.days += n
			case "h":
				sp.d += time.Duration(n) * time.Hour
			}
		}
		return sp, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return span{}, fmt.Errorf("%q is neither a span such as 30d, 2w, 1y2m3d, 12h nor a Go duration such as 36h or 90m0s", s)
	}
	if d < 0 {
		return span{}, fmt.Errorf("%q is negative", s)
	}
	return span{d: d}, nil
}

// before returns t less the span, in calendar terms in t's location.
func (sp span) before(t time.Time) time.Time {
	return t.AddDate(-sp.years, -sp.months, -sp.days).Add(-sp.d)
}

// duration approximates the span as a fixed duration (a month counts 30
// days, a year 365): what a keep rule counted from each group's newest
// snapshot takes.
func (sp span) duration() time.Duration {
	days := 365*sp.years + 30*sp.months + sp.days
	return time.Duration(days)*24*time.Hour + sp.d
}

// dateLayouts are the absolute forms --before and --after take, in the
// local time zone unless they name one.
var dateLayouts = []string{
	time.RFC3339Nano,
	"2006-01-02 15:04:05",
	"2006-01-02T15:04:05",
	"2006-01-02 15:04",
	"2006-01-02T15:04",
	"2006-01-02",
}

// parseWhen reads a --before/--after value: an RFC 3339 time, a local
// date or date and time (2026-11-30, 2026-11-30 14:00), or a span ago
// (3d, 2w, 1y2m, 36h) counted back from now.
func parseWhen(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	for _, l := range dateLayouts {
		var (
			t   time.Time
			err error
		)
		if l == time.RFC3339Nano {
			t, err = time.Parse(l, s)
		} else {
			t, err = time.ParseInLocation(l, s, time.Local)
		}
		if err == nil {
			return t, nil
		}
	}
	sp, err := parseSpan(s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is not a date (2026-11-30, 2026-11-30 14:00, RFC 3339) nor a time ago (3d, 2w, 1y2m, 36h)", s)
	}
	return sp.before(now), nil
}
