package cli

import (
	"os/exec"
	"strings"
	"testing"
)

func TestParseSSHTarget(t *testing.T) {
	for _, c := range []struct {
		in   string
		want sshLocation
		err  string
	}{
		{in: "ssh://root@host/dev/vdb", want: sshLocation{user: "root", host: "host", port: 22, path: "/dev/vdb"}},
		{in: "ssh://u@10.0.0.2:2222/srv/disk%20one.img", want: sshLocation{user: "u", host: "10.0.0.2", port: 2222, path: "/srv/disk one.img"}},
		{in: "ssh://u@[::1]:22/dev/sdb", want: sshLocation{user: "u", host: "::1", port: 22, path: "/dev/sdb"}},
		{in: "ssh://host/dev/vdb", want: sshLocation{host: "host", port: 22, path: "/dev/vdb"}},
		{in: "ssh://u:secret@host/dev/vdb", err: "no password"},
		{in: "ssh://u@host:0/dev/vdb", err: "bad port"},
		{in: "ssh://u@host:99999/dev/vdb", err: "bad port"},
		{in: "ssh://u@host", err: "absolute path"},
		{in: "ssh://u@host/", err: "absolute path"},
		{in: "ssh://u@host/dev/vdb?x=1", err: "absolute path"},
		{in: "nbd://host/export", err: "ssh://USER@HOST"},
		{in: "https://host/x", err: "ssh://USER@HOST"},
	} {
		got, err := parseSSHTarget(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: %v, want %q", c.in, err, c.err)
			}
			if strings.Contains(c.in, "secret") && err != nil && strings.Contains(err.Error(), "secret") {
				t.Errorf("%s: the error shows the password: %v", c.in, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s: %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

// The quoted path reaches the remote command as one argument, whatever
// it holds.
func TestShellQuote(t *testing.T) {
	for _, p := range []string{"/dev/vdb", "/srv/it's a disk.img", "/x/$(touch /tmp/pwned)`id`;\"\\", "/tmp/'''"} {
		out, err := exec.Command("sh", "-c", "printf %s "+shellQuote(p)).Output()
		if err != nil || string(out) != p {
			t.Errorf("%q through the shell: %q, %v", p, out, err)
		}
	}
}
