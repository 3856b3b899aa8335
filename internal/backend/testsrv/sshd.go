package testsrv

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// SSHD is a running OpenSSH server that accepts one throw-away user key.
type SSHD struct {
	*process
	Port int
	User string
	// Key is the user's private key file; KnownHosts a known_hosts file
	// that holds the server's host key for [127.0.0.1]:Port.
	Key        string
	KnownHosts string
	// HostKeyLine is that known_hosts line.
	HostKeyLine string
	Dir         string
}

// StartSSHD starts sshd on a free port of 127.0.0.1 with a fresh host key,
// accepting a fresh ed25519 user key for the current user, and with SFTP.
// sftpArgs are passed to internal-sftp (for example "-P", "remove").
func StartSSHD(t testing.TB, sftpArgs ...string) *SSHD {
	t.Helper()
	sshd, err := exec.LookPath("sshd")
	if err != nil {
		for _, p := range []string{"/usr/sbin/sshd", "/usr/local/sbin/sshd"} {
			if _, serr := os.Stat(p); serr == nil {
				sshd, err = p, nil
			}
		}
	}
	if err != nil {
		missing(t, "OpenSSH's sshd (Debian package openssh-server)")
	}
	keygen, err := exec.LookPath("ssh-keygen")
	if err != nil {
		missing(t, "ssh-keygen (Debian package openssh-client)")
	}
	u, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// sshd wants its files not writable by others.
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	hostKey, userKey := filepath.Join(dir, "host_ed25519"), filepath.Join(dir, "id_ed25519")
	for _, k := range []string{hostKey, userKey} {
		if out, err := exec.Command(keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sauve-test", "-f", k).CombinedOutput(); err != nil {
			t.Fatalf("ssh-keygen: %v\n%s", err, out)
		}
	}
	pub, err := os.ReadFile(userKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	auth := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(auth, pub, 0o600); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// The privilege separation directory Debian's sshd insists on.
		_ = os.MkdirAll("/run/sshd", 0o755)
	}
	port := FreePort(t)
	conf := filepath.Join(dir, "sshd_config")
	cfg := strings.Join([]string{
		"Port " + strconv.Itoa(port),
		"ListenAddress 127.0.0.1",
		"HostKey " + hostKey,
		"PidFile " + filepath.Join(dir, "sshd.pid"),
		"AuthorizedKeysFile " + auth,
		"StrictModes no",
		"UsePAM no",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PubkeyAuthentication yes",
		"PermitRootLogin prohibit-password",
		"AllowUsers " + u.Username,
		"MaxStartups 100",
		"MaxSessions 100",
		strings.TrimSpace("Subsystem sftp internal-sftp " + strings.Join(sftpArgs, " ")),
		"LogLevel ERROR",
		"",
	}, "\n")
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := start(t, "sshd", port, []string{sshd, "-D", "-e", "-f", conf}, nil)
	hpub, err := os.ReadFile(hostKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(hpub))
	line := fmt.Sprintf("[127.0.0.1]:%d %s %s", port, fields[0], fields[1])
	kh := filepath.Join(dir, "known_hosts")
	if err := os.WriteFile(kh, []byte(line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return &SSHD{process: p, Port: port, User: u.Username, Key: userKey, KnownHosts: kh, HostKeyLine: line, Dir: dir}
}

// URL returns an sftp:// location for path on the server.
func (s *SSHD) URL(path string) string {
	return fmt.Sprintf("sftp://%s@127.0.0.1:%d%s", s.User, s.Port, path)
}
