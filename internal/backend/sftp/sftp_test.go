package sftp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/faultproxy"
	"github.com/sauve-backup/sauve/internal/backend/sftp"
	"github.com/sauve-backup/sauve/internal/backend/testsrv"
)

func open(t *testing.T, srv *testsrv.SSHD, path, knownHosts string) *sftp.Backend {
	t.Helper()
	be, err := sftp.Open(sftp.Config{
		User: srv.User, Host: "127.0.0.1", Port: srv.Port, Path: path,
		KeyFiles: []string{srv.Key}, KnownHosts: []string{knownHosts}, NoAgent: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	return be
}

func TestConformance(t *testing.T) {
	srv := testsrv.StartSSHD(t)
	dir := filepath.Join(t.TempDir(), "repo")
	be := open(t, srv, dir, srv.KnownHosts)
	backendtest.Run(t, be, backendtest.Options{LargeSize: 3<<20 + 5})
	// No temporary files are left behind.
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasPrefix(fi.Name(), ".tmp-") {
			t.Errorf("temporary file left: %s", p)
		}
		return nil
	})
}

func TestHostKeyChecks(t *testing.T) {
	srv := testsrv.StartSSHD(t)
	ctx := context.Background()
	dir := t.TempDir()
	h := backend.Handle{Type: backend.ConfigFile}

	// Unknown host: an empty known_hosts.
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	_, err := open(t, srv, dir, empty).Stat(ctx, h)
	if err == nil || !errors.Is(err, backend.ErrPermission) || !strings.Contains(err.Error(), "is not known (ssh-ed25519 SHA256:") ||
		!strings.Contains(err.Error(), "ssh-keyscan -p") {
		t.Fatalf("unknown host key: %v", err)
	}

	// Changed host key: known_hosts holds another key for the address.
	other := filepath.Join(dir, "otherkey")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	pub, _ := os.ReadFile(other + ".pub")
	f := strings.Fields(string(pub))
	changed := filepath.Join(dir, "changed")
	os.WriteFile(changed, []byte(strings.Fields(srv.HostKeyLine)[0]+" "+f[0]+" "+f[1]+"\n"), 0o600)
	_, err = open(t, srv, dir, changed).Stat(ctx, h)
	if err == nil || !errors.Is(err, backend.ErrPermission) || !strings.Contains(err.Error(), "has CHANGED") || !strings.Contains(err.Error(), "ssh-keygen -R") {
		t.Fatalf("changed host key: %v", err)
	}

	// A known key of another type: the client asks for the known type
	// instead of calling it a change.
	rsa := filepath.Join(dir, "rsa")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", rsa).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	pub, _ = os.ReadFile(rsa + ".pub")
	f = strings.Fields(string(pub))
	mixed := filepath.Join(dir, "mixed")
	os.WriteFile(mixed, []byte(strings.Fields(srv.HostKeyLine)[0]+" "+f[0]+" "+f[1]+"\n"), 0o600)
	_, err = open(t, srv, dir, mixed).Stat(ctx, h)
	if err == nil || !strings.Contains(err.Error(), "has CHANGED") {
		// The server has no RSA key, so this is a change after all, but
		// it must be reported as one, not as a handshake failure.
		t.Fatalf("known key of another type: %v", err)
	}
}

func TestRefusedKey(t *testing.T) {
	srv := testsrv.StartSSHD(t)
	dir := t.TempDir()
	stranger := filepath.Join(dir, "id_stranger")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	be, err := sftp.Open(sftp.Config{User: srv.User, Host: "127.0.0.1", Port: srv.Port, Path: dir,
		KeyFiles: []string{stranger}, KnownHosts: []string{srv.KnownHosts}, NoAgent: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = be.Stat(context.Background(), backend.Handle{Type: backend.ConfigFile})
	if err == nil || !errors.Is(err, backend.ErrPermission) || !strings.Contains(err.Error(), "authorized_keys") {
		t.Fatalf("refused key: %v", err)
	}

	// A key with a passphrase and no agent: say how to use it.
	locked := filepath.Join(dir, "id_locked")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "secret phrase", "-f", locked).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	t.Setenv("HOME", dir)
	os.MkdirAll(filepath.Join(dir, ".ssh"), 0o700)
	os.Rename(locked, filepath.Join(dir, ".ssh", "id_ed25519"))
	_, err = sftp.Open(sftp.Config{User: srv.User, Host: "127.0.0.1", Port: srv.Port, Path: dir, NoAgent: true})
	if err == nil || !strings.Contains(err.Error(), "passphrase") || !strings.Contains(err.Error(), "ssh-add") {
		t.Fatalf("passphrase-protected key without agent: %v", err)
	}
}

// TestConfigCreateOnlyAcrossClients: two clients race to create the
// config; the second is refused.
func TestConfigCreateOnlyAcrossClients(t *testing.T) {
	srv := testsrv.StartSSHD(t)
	dir := t.TempDir()
	ctx := context.Background()
	a, b := open(t, srv, dir, srv.KnownHosts), open(t, srv, dir, srv.KnownHosts)
	h := backend.Handle{Type: backend.ConfigFile}
	if err := a.Save(ctx, h, bytes.NewReader([]byte("one")), 3); err != nil {
		t.Fatal(err)
	}
	if err := b.Save(ctx, h, bytes.NewReader([]byte("two")), 3); !errors.Is(err, backend.ErrExists) {
		t.Fatalf("second client's config: %v, want ErrExists", err)
	}
}

func TestConformanceUnderFaults(t *testing.T) {
	srv := testsrv.StartSSHD(t)
	dir := filepath.Join(t.TempDir(), "repo")
	kh := filepath.Join(t.TempDir(), "known_hosts")
	backendtest.RunUnderFaults(t, fmt.Sprintf("127.0.0.1:%d", srv.Port), backendtest.Options{LargeSize: 13 << 20, Faults: &faultproxy.Faults{Every: 5 << 20, Drop: 2, Stall: 1, Truncate: 2, StallFor: 3 * time.Second}}, func(addr string) backend.Backend {
		host, port, _ := net.SplitHostPort(addr)
		p, _ := strconv.Atoi(port)
		// The proxy's address must be known with the server's key.
		os.WriteFile(kh, []byte(fmt.Sprintf("[%s]:%d %s\n", host, p, strings.SplitN(srv.HostKeyLine, " ", 2)[1])), 0o600)
		be, err := sftp.Open(sftp.Config{User: srv.User, Host: host, Port: p, Path: dir,
			KeyFiles: []string{srv.Key}, KnownHosts: []string{kh}, NoAgent: true, IdleTimeout: 1500 * time.Millisecond, Retry: backendtest.Retry})
		if err != nil {
			t.Fatal(err)
		}
		return be
	})
}

func TestPartialUploadInvisible(t *testing.T) {
	srv := testsrv.StartSSHD(t)
	dir := filepath.Join(t.TempDir(), "repo")
	kh := filepath.Join(t.TempDir(), "known_hosts")
	backendtest.RunPartialUpload(t, fmt.Sprintf("127.0.0.1:%d", srv.Port), backendtest.Options{LargeSize: 6 << 20}, func(addr string) backend.Backend {
		host, port, _ := net.SplitHostPort(addr)
		p, _ := strconv.Atoi(port)
		os.WriteFile(kh, []byte(fmt.Sprintf("[%s]:%d %s\n", host, p, strings.SplitN(srv.HostKeyLine, " ", 2)[1])), 0o600)
		be, err := sftp.Open(sftp.Config{User: srv.User, Host: host, Port: p, Path: dir,
			KeyFiles: []string{srv.Key}, KnownHosts: []string{kh}, NoAgent: true, IdleTimeout: 1500 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		return be
	})
}
