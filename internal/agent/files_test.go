package agent

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestKeyFiles(t *testing.T) {
	dir := t.TempDir()
	priv := mustKey(t)
	path := filepath.Join(dir, "key")
	if err := WritePrivateKey(path, priv); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %o", fi.Mode().Perm())
	}
	if err := WritePrivateKey(path, mustKey(t)); err == nil || !strings.Contains(err.Error(), "exists already") {
		t.Errorf("overwrite: %v", err)
	}
	got, err := LoadPrivateKey(path)
	if err != nil || !got.Equal(priv) {
		t.Fatalf("load: %v", err)
	}
	os.Chmod(path, 0o644)
	if _, err := LoadPrivateKey(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a key others may read: %v", err)
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("not a key"), 0o600)
	if _, err := LoadPrivateKey(bad); err == nil || !strings.Contains(err.Error(), "PEM") {
		t.Errorf("garbage key: %v", err)
	}

	pub := PublicOf(priv)
	line := pub.Line("web1 agent")
	k, c, err := ParsePublicKey(line)
	if err != nil || k != pub || c != "web1 agent" {
		t.Fatalf("parse %q: %v %q", line, err, c)
	}
	if !strings.HasPrefix(pub.Fingerprint(), "SHA256:") || len(pub.Fingerprint()) != 7+43 {
		t.Errorf("fingerprint %q", pub.Fingerprint())
	}
	pubFile := filepath.Join(dir, "key.pub")
	os.WriteFile(pubFile, []byte(line+"\n"), 0o644)
	for _, arg := range []string{line, pubFile} {
		if k, _, err := ReadPublicKeyArg(arg); err != nil || k != pub {
			t.Errorf("ReadPublicKeyArg(%q): %v", arg, err)
		}
	}
	for _, s := range []string{"", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB", KeyType + " AAAA", KeyType + " " + strings.Repeat("!", 44)} {
		if _, _, err := ParsePublicKey(s); err == nil {
			t.Errorf("ParsePublicKey(%q) accepted", s)
		}
	}
}

func TestAuthorizedLines(t *testing.T) {
	k := PublicOf(mustKey(t))
	ip := func(s string) Peer { return Peer{Addr: s, IP: netip.MustParseAddr(s)} }
	serial := Peer{Addr: "serial:x", Serial: true}
	for _, tc := range []struct {
		line    string
		window  time.Duration
		comment string
		allow   []Peer
		deny    []Peer
	}{
		{line: k.String(), allow: []Peer{ip("1.2.3.4"), serial}},
		{line: k.Line("backup@vmhost"), comment: "backup@vmhost"},
		{line: `from="10.0.0.0/8,192.168.1.5" ` + k.Line("b"), comment: "b",
			allow: []Peer{ip("10.9.8.7"), ip("192.168.1.5"), ip("::ffff:10.1.1.1")}, deny: []Peer{ip("192.168.1.6"), ip("11.0.0.1"), serial, {Addr: "pipe"}}},
		{line: `window=30s,from="serial" ` + k.String(), window: 30 * time.Second, allow: []Peer{serial}, deny: []Peer{ip("10.0.0.1")}},
		{line: `from="2001:db8::/32",window=1m ` + k.String(), window: time.Minute, allow: []Peer{ip("2001:db8::1")}, deny: []Peer{ip("2001:db9::1")}},
		{line: `from=10.0.0.1 ` + k.String(), allow: []Peer{ip("10.0.0.1")}, deny: []Peer{ip("10.0.0.2")}},
	} {
		a, ok, err := ParseAuthorizedLine(tc.line)
		if err != nil || !ok {
			t.Errorf("%q: %v", tc.line, err)
			continue
		}
		if a.Key != k || a.Window != tc.window || a.Comment != tc.comment {
			t.Errorf("%q: %+v", tc.line, a)
		}
		for _, p := range tc.allow {
			if !a.Allows(p) {
				t.Errorf("%q does not allow %s", tc.line, p.Addr)
			}
		}
		for _, p := range tc.deny {
			if a.Allows(p) {
				t.Errorf("%q allows %s", tc.line, p.Addr)
			}
		}
		// What String writes reads back the same.
		b, _, err := ParseAuthorizedLine(a.String())
		if err != nil || b.String() != a.String() {
			t.Errorf("%q: round trip %q: %v", tc.line, a.String(), err)
		}
	}
	for _, tc := range []struct{ line, err string }{
		{`command="rm -rf /" ` + k.String(), `unknown option "command"`},
		{`from="example.com" ` + k.String(), "host names are not accepted"},
		{`from="10.0.0.0/33" ` + k.String(), "not a CIDR prefix"},
		{`from="" ` + k.String(), "empty item"},
		{`from="10.0.0.1 ` + k.String(), "quotes are not closed"},
		{`window=0s ` + k.String(), "more than 0"},
		{`window=2h ` + k.String(), "at most 1h"},
		{`window=30s,window=1s ` + k.String(), "given twice"},
		{`from ` + k.String(), "wants a value"},
		{`window=30s`, "no public key"},
		{"ssh-ed25519 AAAA", "a public key starts with"},
	} {
		_, _, err := ParseAuthorizedLine(tc.line)
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%q: %v, want %q", tc.line, err, tc.err)
		}
	}
	for _, l := range []string{"", "  ", "# a comment"} {
		if _, ok, err := ParseAuthorizedLine(l); ok || err != nil {
			t.Errorf("%q: %v %v", l, ok, err)
		}
	}
}

func TestAuthorizedFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "authorized_keys")
	k1, k2 := PublicOf(mustKey(t)), PublicOf(mustKey(t))
	ak, err := LoadAuthorized(path)
	if err != nil || len(ak.Keys) != 0 {
		t.Fatalf("missing file: %v", err)
	}
	if err := AppendAuthorized(path, AuthorizedKey{Key: k1, Comment: "one"}); err != nil {
		t.Fatal(err)
	}
	// A hand edit without the last newline.
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString("# hand-written")
	f.Close()
	from, serial, _ := ParseFrom("10.0.0.0/8,serial")
	if err := AppendAuthorized(path, AuthorizedKey{Key: k2, From: from, Serial: serial, Window: 30 * time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := AppendAuthorized(path, AuthorizedKey{Key: k1}); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("duplicate: %v", err)
	}
	ak, err = LoadAuthorized(path)
	if err != nil || len(ak.Keys) != 2 {
		t.Fatalf("load: %v %+v", err, ak)
	}
	if a, ok := ak.Lookup(k2); !ok || a.Line != 3 || a.Window != 30*time.Second || !a.Serial {
		t.Errorf("k2: %+v", a)
	}
	data, _ := os.ReadFile(path)
	want := k1.Line("one") + "\n# hand-written\n" + `from="10.0.0.0/8,serial",window=30s ` + k2.String() + "\n"
	if string(data) != want {
		t.Errorf("file:\n%s\nwant\n%s", data, want)
	}
	// A bad line fails the whole file, naming it.
	os.WriteFile(path, append(data, "bogus line\n"...), 0o644)
	if _, err := LoadAuthorized(path); err == nil || !strings.Contains(err.Error(), path+":4:") {
		t.Errorf("bad line: %v", err)
	}
	os.WriteFile(path, []byte(k1.String()+"\n"+k1.String()+"\n"), 0o644)
	if _, err := LoadAuthorized(path); err == nil || !strings.Contains(err.Error(), "listed already on line 1") {
		t.Errorf("duplicate key: %v", err)
	}
	os.WriteFile(path, []byte(strings.Repeat("#", maxListLine+10)+"\n"), 0o644)
	if _, err := LoadAuthorized(path); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("long line: %v", err)
	}
	os.WriteFile(path, []byte(strings.Repeat("# comment line\n", maxListFile/15+10)), 0o644)
	if _, err := LoadAuthorized(path); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("huge file: %v", err)
	}
}

func TestKnownAgents(t *testing.T) {
	path := filepath.Join(t.TempDir(), "known_agents")
	k1, k2 := PublicOf(mustKey(t)), PublicOf(mustKey(t))
	if err := AppendKnown(path, KnownAgent{Addr: "10.0.0.5:7412", Key: k1}); err != nil {
		t.Fatal(err)
	}
	if err := AppendKnown(path, KnownAgent{Addr: "unix:/run/vm1.sock", Key: k2, Comment: "vm1"}); err != nil {
		t.Fatal(err)
	}
	if err := AppendKnown(path, KnownAgent{Addr: "10.0.0.5:7412", Key: k2}); err == nil {
		t.Error("a second key for an address was recorded")
	}
	ka, err := LoadKnown(path)
	if err != nil {
		t.Fatal(err)
	}
	if a, ok := ka.Lookup("10.0.0.5:7412"); !ok || a.Key != k1 || a.Line != 1 {
		t.Errorf("lookup: %+v", a)
	}
	if a, ok := ka.Lookup("unix:/run/vm1.sock"); !ok || a.Key != k2 || a.Comment != "vm1" {
		t.Errorf("lookup: %+v", a)
	}
	// Addresses are normalized: tcp:, agent:// and a host's case.
	k, ok, err := ParseKnownLine("tcp:DB1.example:7412 " + k1.String())
	if err != nil || !ok || k.Addr != "db1.example:7412" {
		t.Errorf("normalized: %+v %v", k, err)
	}
	for _, l := range []string{"10.0.0.5:7412", "10.0.0.5:99999 " + k1.String(), "10.0.0.5:7412 ssh-ed25519 AAAA"} {
		if _, _, err := ParseKnownLine(l); err == nil {
			t.Errorf("%q accepted", l)
		}
	}
	os.WriteFile(path, []byte("a:1 "+k1.String()+"\nA:1 "+k2.String()+"\n"), 0o644)
	if _, err := LoadKnown(path); err == nil || !strings.Contains(err.Error(), "listed already") {
		t.Errorf("an address listed twice: %v", err)
	}
}

func TestParseAddress(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.5:7412":         "10.0.0.5:7412",
		"tcp:10.0.0.5:7412":     "10.0.0.5:7412",
		"agent://db1:7412":      "db1:7412",
		"agent://db1/":          "db1:7412",
		"DB1":                   "db1:7412",
		"[::1]:9":               "[::1]:9",
		"::1":                   "[::1]:7412",
		"unix:/run/vm1.sock":    "unix:/run/vm1.sock",
		"unix:relative/vm.sock": "unix:relative/vm.sock",
	} {
		a, err := ParseAddress(in)
		if err != nil || a.Key() != want {
			t.Errorf("ParseAddress(%q) = %v, %v; want %s", in, a, err, want)
		}
	}
	for _, in := range []string{"", "unix:", "h:0", "h:65536", "h:x", ":7412", "a b:1", strings.Repeat("a", 2000)} {
		if a, err := ParseAddress(in); err == nil {
			t.Errorf("ParseAddress(%q) = %v", in, a)
		}
	}
}
