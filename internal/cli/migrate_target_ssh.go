package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/sauve-backup/sauve/internal/backend/sftp"
	"github.com/sauve-backup/sauve/internal/migrate"
	"github.com/sauve-backup/sauve/internal/remote"
)

// sshTargetKind is a disk or file on another machine, reached over SSH,
// as a migration's target: sauve there (sauve migrate-receive, started
// through the session) writes it, receiving the writes compressed.
func sshTargetKind() targetKind {
	return targetKind{name: "ssh", match: func(p string) bool { return strings.Contains(p, "://") },
		open:   func(p string) (migrationTarget, error) { return openSSHTarget(p, 0) },
		create: openSSHTarget}
}

// remote says whether targets of kind k are on another machine, where
// only the other end can say whether they exist.
func (k targetKind) remote() bool { return k.name == "ssh" }

// openRemoteTarget opens a remote target if it exists (on the other
// end): nothing for a local kind, whose existence os.Stat says.
func (m *migration) openRemoteTarget(k targetKind, path string) (bool, error) {
	if !k.remote() {
		return false, nil
	}
	t, err := k.open(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	m.target = t
	return true, nil
}

// sshDialTimeout bounds connecting and signing in, and any silence of
// the connection after (netx's idle timeout): a stalled link fails the
// pass instead of hanging it.
const sshDialTimeout = time.Minute

// sshKeepalive is how often a request crosses the connection, so that a
// pass reading unchanged chunks for minutes, or a long sync there, is
// not taken for a stalled link.
const sshKeepalive = 15 * time.Second

// sshLocation is a parsed ssh://USER@HOST[:PORT]/PATH.
type sshLocation struct {
	user, host string
	port       int
	path       string
}

func parseSSHTarget(p string) (sshLocation, error) {
	u, err := url.Parse(p)
	if err != nil || u.Scheme != "ssh" {
		return sshLocation{}, fmt.Errorf("target %s: a remote target is ssh://USER@HOST[:PORT]/PATH (a block device or a file there)", p)
	}
	l := sshLocation{user: u.User.Username(), host: u.Hostname(), port: 22, path: u.Path}
	if _, set := u.User.Password(); set {
		return l, fmt.Errorf("target %s: no password in the URL: sauve signs in with ssh-agent or a key (~/.ssh/id_*, $SAUVE_SSH_KEY)", u.Redacted())
	}
	if ps := u.Port(); ps != "" {
		if l.port, err = strconv.Atoi(ps); err != nil || l.port < 1 || l.port > 65535 {
			return l, fmt.Errorf("target %s: bad port %q", p, ps)
		}
	}
	if l.host == "" || l.path == "" || l.path == "/" || u.RawQuery != "" || u.Fragment != "" {
		return l, fmt.Errorf("target %s: a remote target is ssh://USER@HOST[:PORT]/PATH, with the absolute path of a block device or a file there", p)
	}
	return l, nil
}

// sshTarget is a remote target: the SSH connection, the session running
// sauve migrate-receive there, and the protocol's local end.
type sshTarget struct {
	url    string
	loc    sshLocation
	client *ssh.Client
	sess   *ssh.Session
	stdin  io.WriteCloser
	c      *remote.Client
	stderr *tailBuffer
	stop   chan struct{} // closed by Close: ends keepalive
	once   sync.Once
	exited chan struct{} // closed when the remote command has ended
}

// waitExit waits at most d for the remote command to end (a session is
// waited for once).
func (t *sshTarget) waitExit(d time.Duration) {
	t.once.Do(func() {
		t.exited = make(chan struct{})
		go func() { t.sess.Wait(); close(t.exited) }()
	})
	select {
	case <-t.exited:
	case <-time.After(d):
	}
}

// openSSHTarget connects, starts the remote end and opens the target
// there: an existing one, or, when create is above 0 and it does not
// exist, a new file of create bytes. An existing target given a create
// size is zeroed whole, as a created one reads.
func openSSHTarget(p string, create int64) (migrationTarget, error) {
	loc, err := parseSSHTarget(p)
	if err != nil {
		return nil, err
	}
	cfg := sftp.Config{User: loc.user, Host: loc.host, Port: loc.port, IdleTimeout: sshDialTimeout}
	if k := os.Getenv("SAUVE_SSH_KEY"); k != "" {
		cfg.KeyFiles = []string{k}
	}
	if k := os.Getenv("SAUVE_SSH_KNOWN_HOSTS"); k != "" {
		cfg.KnownHosts = []string{k}
	}
	ctx, cancel := context.WithTimeout(context.Background(), sshDialTimeout)
	defer cancel()
	client, err := sftp.DialSSH(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", p, err)
	}
	t := &sshTarget{url: p, loc: loc, client: client, stderr: &tailBuffer{max: 4096}, stop: make(chan struct{})}
	go t.keepalive(sshKeepalive)
	if err := t.start(create); err != nil {
		t.Close()
		return nil, fmt.Errorf("target %s: %w", p, err)
	}
	return t, nil
}

func (t *sshTarget) start(create int64) error {
	var err error
	if t.sess, err = t.client.NewSession(); err != nil {
		return fmt.Errorf("open an SSH session: %w", err)
	}
	if t.stdin, err = t.sess.StdinPipe(); err != nil {
		return err
	}
	stdout, err := t.sess.StdoutPipe()
	if err != nil {
		return err
	}
	t.sess.Stderr = t.stderr
	bin := remoteSauve()
	// The binary is a command line of the user's (it may be "sudo
	// sauve"); the path is quoted for the remote shell.
	if err := t.sess.Start(bin + " migrate-receive " + shellQuote(t.loc.path)); err != nil {
		return fmt.Errorf("start %s on %s: %w", bin, t.loc.host, err)
	}
	// A remote command that never answers (waiting for a password, a
	// shell stuck in its profile) must not hang the migration: the
	// connection is kept alive, so only this timer ends it.
	timer := time.AfterFunc(sshDialTimeout, func() { t.sess.Close() })
	t.c, err = remote.Dial(stdout, t.stdin, t.loc.path, create)
	if !timer.Stop() && err != nil {
		err = fmt.Errorf("no answer in %v: %w", sshDialTimeout, err)
	}
	if err != nil {
		var re *remote.RemoteError
		if errors.As(err, &re) {
			if strings.Contains(re.Text, "no such file or directory") {
				return fmt.Errorf("%w (%w)", err, os.ErrNotExist)
			}
			return err
		}
		return t.startError(bin, err)
	}
	info := t.c.Info()
	if create > 0 && info.Size < create {
		return fmt.Errorf("%s on %s holds %d bytes, the source %d: refusing a migration that would not fit", t.loc.path, info.Host, info.Size, create)
	}
	if create > 0 && !info.Created {
		// An existing disk given for a new migration: made zeros, as
		// the state of a new target assumes.
		if err := t.c.Zero(0, info.Size); err != nil {
			return err
		}
		return t.c.Sync()
	}
	return nil
}

// keepalive sends a request every period until Close.
func (t *sshTarget) keepalive(every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-t.stop:
			return
		case <-tick.C:
			if _, _, err := t.client.SendRequest("keepalive@openssh.com", true, nil); err != nil {
				return
			}
		}
	}
}

// startError explains a remote end that did not answer: most often sauve
// is not installed there, or not in the PATH of a non-interactive shell.
func (t *sshTarget) startError(bin string, err error) error {
	t.waitExit(5 * time.Second)
	msg := strings.TrimSpace(t.stderr.String())
	if msg == "" {
		msg = err.Error()
	}
	return fmt.Errorf("%q on %s did not answer as sauve migrate-receive: %s (install the same sauve version there, or name it with --remote-sauve or $SAUVE_REMOTE_SAUVE)", bin, t.loc.host, msg)
}

func (t *sshTarget) WriteAt(p []byte, off int64) (int, error) {
	n, err := t.c.WriteAt(p, off)
	return n, t.withStderr(err)
}
func (t *sshTarget) Zero(off, n int64) error { return t.withStderr(t.c.Zero(off, n)) }
func (t *sshTarget) Sync() error             { return t.withStderr(t.c.Sync()) }

// withStderr adds to err what the remote command said on its standard
// error (a crash there, a kill), if anything.
func (t *sshTarget) withStderr(err error) error {
	var re *remote.RemoteError
	if err == nil || errors.As(err, &re) {
		return err // the remote end's own words already
	}
	if msg := strings.TrimSpace(t.stderr.String()); msg != "" {
		return fmt.Errorf("%w (%s said: %s)", err, remoteSauve(), msg)
	}
	return err
}
func (t *sshTarget) Path() string { return t.url }
func (t *sshTarget) Size() int64  { return t.c.Info().Size }

// Identity is the remote target's device or inode: the URL names the
// machine.
func (t *sshTarget) Identity() (migrate.Identity, error) {
	i := t.c.Info()
	return migrate.Identity{Path: t.url, Size: i.Size, Device: i.Device, FileDev: i.FileDev, Inode: i.Inode}, nil
}

// Close ends the session: the remote end sees its input close, closes
// the target and exits.
func (t *sshTarget) Close() error {
	select {
	case <-t.stop:
		return nil // closed already
	default:
		close(t.stop)
	}
	if t.c != nil {
		t.c.Close()
	}
	if t.stdin != nil {
		t.stdin.Close()
	}
	if t.sess != nil {
		t.waitExit(10 * time.Second)
		t.sess.Close()
	}
	return t.client.Close()
}

// remoteSauve is the command that runs sauve on the remote machine.
func remoteSauve() string {
	if s := os.Getenv("SAUVE_REMOTE_SAUVE"); s != "" {
		return s
	}
	return "sauve"
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// tailBuffer keeps the first max bytes written to it: the remote end's
// standard error, for messages.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   bytes.Buffer
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.b.Len(); room > 0 {
		b.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
