package qmp

import (
	"testing"
)

func TestParseMessage(t *testing.T) {
	for _, tc := range []struct {
		line string
		kind kind
		ok   bool
	}{
		{`{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}`, kindGreeting, true},
		{`{"QMP": {"capabilities": []}}`, 0, false},
		{`{"return": {}, "id": 7}`, kindReply, true},
		{`{"return": [], "id": "x"}`, 0, false},
		{`{"error": {"class": "GenericError", "desc": "no"}, "id": 3}`, kindReply, true},
		{`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}`, kindEvent, true},
		{`{"hello": 1}`, 0, false},
		{`[1]`, 0, false},
		{`SSH-2.0`, 0, false},
	} {
		m, err := parseMessage([]byte(tc.line))
		if (err == nil) != tc.ok || m.kind != tc.kind {
			t.Errorf("%s: kind %d, %v; want kind %d, ok %v", tc.line, m.kind, err, tc.kind, tc.ok)
		}
	}
	m, _ := parseMessage([]byte(`{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "Debian"}}}`))
	if m.version != (Version{7, 2, 1, "Debian"}) || !m.version.AtLeast(7, 0) || m.version.AtLeast(7, 3) || m.version.AtLeast(8, 0) {
		t.Errorf("version %+v", m.version)
	}
	m, _ = parseMessage([]byte(`{"error": {"class": "GenericError", "desc": "no"}, "id": 3}`))
	if m.id != 3 || !m.hasID || m.err.Class != "GenericError" || m.err.Desc != "no" {
		t.Errorf("error reply %+v", m)
	}
}

func FuzzParseMessage(f *testing.F) {
	for _, s := range []string{
		`{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}`,
		`{"return": {"name": "vm1"}, "id": 1}`,
		`{"error": {"class": "GenericError", "desc": "no"}, "id": 18446744073709551615}`,
		`{"timestamp": {"seconds": -1, "microseconds": 9999999}, "event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j"}}`,
		`{"QMP": {"version": null}}`,
		`{"return": null, "id": -1}`,
		``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseMessage(b)
		if err != nil {
			return
		}
		switch m.kind {
		case kindGreeting, kindReply, kindEvent:
		default:
			t.Fatalf("parsed %q as kind %d", b, m.kind)
		}
		if m.kind == kindEvent && m.event.Name == "" {
			t.Fatal("event without a name")
		}
		var v struct{ Name string }
		m.result("x", &v)
	})
}
