package cli

import "testing"

func TestFileSpec(t *testing.T) {
	for in, want := range map[string]fileSpec{
		"latest":              {snap: "latest", path: "/"},
		"latest:1":            {snap: "latest", part: "1", path: "/", hasPart: true},
		"1a2b:root/etc/x":     {snap: "1a2b", part: "root", path: "/etc/x", hasPart: true},
		"1a2b/etc/../var":     {snap: "1a2b", path: "/var"},
		"1a2b/a:b":            {snap: "1a2b", path: "/a:b"},
		"latest:/etc":         {snap: "latest", path: "/etc", hasPart: true},
		"latest:2/../../../x": {snap: "latest", part: "2", path: "/x", hasPart: true},
	} {
		if got := parseFileSpec(in); got != want {
			t.Errorf("%q: %+v, want %+v", in, got, want)
		}
	}
}

func TestModeString(t *testing.T) {
	for _, c := range []struct {
		typ  string
		mode uint32
		want string
	}{
		{"file", 0o644, "-rw-r--r--"},
		{"dir", 0o1777, "drwxrwxrwt"},
		{"file", 0o4755, "-rwsr-xr-x"},
		{"file", 0o2640, "-rw-r-S---"},
		{"symlink", 0o777, "lrwxrwxrwx"},
		{"char", 0o600, "crw-------"},
		{"fifo", 0o1000, "p--------T"},
	} {
		if got := modeString(c.typ, c.mode); got != c.want {
			t.Errorf("%s %o: %s, want %s", c.typ, c.mode, got, c.want)
		}
	}
}

func TestSafeName(t *testing.T) {
	for n, want := range map[string]bool{"a": true, "..a": true, "": false, ".": false, "..": false, "a/b": false, "a\x00": false} {
		if safeName(n) != want {
			t.Errorf("safeName(%q) = %v", n, !want)
		}
	}
}
