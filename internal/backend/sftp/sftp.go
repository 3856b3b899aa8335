// Package sftp stores a repository in a directory of an SSH server, over
// SFTP (github.com/pkg/sftp on golang.org/x/crypto/ssh).
//
// It signs in with the keys of the user's ssh-agent ($SSH_AUTH_SOCK) and
// the usual key files (~/.ssh/id_ed25519, id_ecdsa, id_rsa, or those named
// in Config.KeyFiles), and it trusts a server only when its host key is in
// ~/.ssh/known_hosts (or /etc/ssh/ssh_known_hosts): an unknown key or a
// changed one stops with an error that says which, shows the fingerprint
// and how to proceed. There is no option to skip the check.
//
// Objects are written to a temporary file (".tmp-" names, which List
// never reports) in the object's directory, synced (fsync@openssh.com) and
// renamed into place, so a reader sees no object or all of it. The config
// is renamed with plain SFTP rename, which OpenSSH implements with link(2)
// and which therefore never replaces an existing file; other objects use
// posix-rename@openssh.com where the server has it, and plain rename
// otherwise (an object already there under a content-addressed name is
// the same object).
//
// A dropped connection is redialled on the next request; the retry
// wrapper (package retry) supplies the pauses. SSH keepalives at a third of
// the idle timeout make a silent server fail requests instead of hanging.
package sftp

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sync/errgroup"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/netx"
)

// DefaultConnections is how many objects are transferred at once (SFTP
// pipelines the requests of each over one SSH connection).
const DefaultConnections = 4

const tmpPrefix = ".tmp-"

// Config says where the repository is and how to sign in.
type Config struct {
	User string // default: the local user name
	Host string
	Port int    // default 22
	Path string // absolute, or relative to the login directory

	// KeyFiles are private key files to offer; empty means the default
	// files in ~/.ssh. Keys protected by a passphrase must be in the agent.
	KeyFiles []string
	// KnownHosts files; empty means ~/.ssh/known_hosts and
	// /etc/ssh/ssh_known_hosts.
	KnownHosts []string
	// NoAgent ignores $SSH_AUTH_SOCK.
	NoAgent bool

	Connections int
	IdleTimeout time.Duration
	// Retry, when set, retries each segment of an upload on its own,
	// resuming where it broke (retry.Do); nil tries once.
	Retry func(ctx context.Context, what string, fn func() error) error
}

// Backend is a repository on an SFTP server.
type Backend struct {
	cfg      Config
	addr     string
	root     string
	location string
	auth     []ssh.AuthMethod
	authDesc []string
	hostKeys ssh.HostKeyCallback
	khFiles  []string
	retry    func(ctx context.Context, what string, fn func() error) error

	mu     sync.Mutex
	sc     *ssh.Client
	client *sftp.Client
	stop   chan struct{}
	dirs   sync.Map // directories known to exist

	noPosixRename atomic.Bool
}

// Open prepares keys and known hosts; it connects on first use.
func Open(cfg Config) (*Backend, error) {
	if cfg.Host == "" {
		return nil, errors.New("sftp: no host")
	}
	if cfg.Port == 0 {
		cfg.Port = 22
	}
	if cfg.User == "" {
		cfg.User = currentUser()
	}
	if cfg.Connections <= 0 {
		cfg.Connections = DefaultConnections
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = netx.DefaultIdleTimeout
	}
	if cfg.Path == "" {
		return nil, errors.New("sftp: no repository path (sftp://USER@HOST/PATH)")
	}
	b := &Backend{cfg: cfg, addr: net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)), root: strings.TrimSuffix(cfg.Path, "/"), retry: cfg.Retry}
	if b.retry == nil {
		b.retry = func(_ context.Context, _ string, fn func() error) error { return fn() }
	}
	if b.root == "" {
		b.root = "/"
	}
	port := ""
	if cfg.Port != 22 {
		port = ":" + strconv.Itoa(cfg.Port)
	}
	host := cfg.Host
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	p := b.root
	if !strings.HasPrefix(p, "/") {
		p = "/~/" + p
	}
	b.location = "sftp://" + cfg.User + "@" + host + port + p
	var err error
	if b.auth, b.authDesc, err = authMethods(cfg); err != nil {
		return nil, err
	}
	if b.hostKeys, b.khFiles, err = knownHosts(cfg.KnownHosts); err != nil {
		return nil, err
	}
	return b, nil
}

func currentUser() string {
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	if u := os.Getenv("LOGNAME"); u != "" {
		return u
	}
	return "root"
}

// Location implements backend.Backend.
func (b *Backend) Location() string { return b.location }

// conn returns the connected client, dialling if there is none.
func (b *Backend) conn(ctx context.Context) (*sftp.Client, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.client != nil {
		return b.client, nil
	}
	sc, err := b.dial(ctx, nil)
	if err != nil {
		return nil, err
	}
	client, err := sftp.NewClient(sc,
		sftp.UseConcurrentWrites(true),
		sftp.UseConcurrentReads(true),
		sftp.MaxConcurrentRequestsPerFile(64),
	)
	if err != nil {
		sc.Close()
		return nil, fmt.Errorf("start SFTP on %s (is the sftp subsystem enabled in sshd_config?): %w", b.addr, err)
	}
	b.sc, b.client, b.stop = sc, client, make(chan struct{})
	go keepalive(sc, b.cfg.IdleTimeout/3, b.stop)
	return client, nil
}

// keepalive sends SSH keepalives so that a silent server trips the idle
// timeout even between requests.
func keepalive(sc *ssh.Client, every time.Duration, stop chan struct{}) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			if _, _, err := sc.SendRequest("keepalive@openssh.com", true, nil); err != nil {
				sc.Close()
				return
			}
		}
	}
}

// broken drops client if a request on it failed in a way that means the
// connection is gone, so that the next request dials anew.
func (b *Backend) broken(client *sftp.Client, err error) {
	if err == nil || !connLost(err) {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.client == client {
		close(b.stop)
		b.client.Close()
		b.sc.Close()
		b.client, b.sc = nil, nil
	}
}

func connLost(err error) bool {
	var ne net.Error
	return errors.Is(err, sftp.ErrSSHFxConnectionLost) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.As(err, &ne) || errors.Is(err, io.EOF) && !isStatus(err)
}

func isStatus(err error) bool {
	var se *sftp.StatusError
	return errors.As(err, &se)
}

func (b *Backend) path(h backend.Handle) string { return path.Join(b.root, h.Path()) }

// wrap classifies an SFTP error.
func (b *Backend) wrap(client *sftp.Client, err error, what string) error {
	if err == nil {
		return nil
	}
	b.broken(client, err)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s: %w", what, backend.ErrNotExist)
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("%s on %s: the server refuses it to user %s: %w", what, b.location, b.cfg.User, backend.ErrPermission)
	}
	var se *sftp.StatusError
	if errors.As(err, &se) && se.FxCode() == sftp.ErrSSHFxOpUnsupported {
		return &backend.Permanent{Err: fmt.Errorf("%s on %s: %w", what, b.location, err)}
	}
	return fmt.Errorf("%s on %s: %w", what, b.location, err)
}

// mkdirAll makes dir (cached: most objects go into directories made before).
func (b *Backend) mkdirAll(client *sftp.Client, dir string) error {
	if _, ok := b.dirs.Load(dir); ok {
		return nil
	}
	if err := client.MkdirAll(dir); err != nil {
		// MkdirAll fails when a concurrent call made it first.
		if fi, serr := client.Stat(dir); serr != nil || !fi.IsDir() {
			return err
		}
	}
	b.dirs.Store(dir, true)
	return nil
}

func contentAddressed(t backend.FileType) bool { return backend.ContentAddressed(t) }

// segment is how much of an object goes up between checkpoints: after a
// broken connection the upload resumes at the last checkpoint on a new
// connection instead of starting over, so that a 32 MiB pack makes
// progress even where connections rarely live that long.
const segment = 4 << 20

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ra, ok := rd.(io.ReaderAt)
	if !ok {
		buf := make([]byte, size)
		if _, err := io.ReadFull(rd, buf); err != nil {
			return &backend.Permanent{Err: fmt.Errorf("read %s to upload: %w", h, err)}
		}
		ra = bytes.NewReader(buf)
	}
	final := b.path(h)
	dir := path.Dir(final)
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := path.Join(dir, tmpPrefix+hex.EncodeToString(rnd[:]))
	var (
		f      *sftp.File
		client *sftp.Client
		off    int64
		done   bool
	)
	closeFile := func() {
		if f != nil {
			f.Close()
			f = nil
		}
	}
	defer func() {
		if !done {
			closeFile()
			if c, err := b.conn(ctx); err == nil {
				c.Remove(tmp)
			}
		}
	}()
	// open (re)opens the temporary file, on a new connection after a
	// broken one.
	open := func() error {
		if f != nil {
			return nil
		}
		c, err := b.conn(ctx)
		if err != nil {
			return err
		}
		client = c
		if err := b.mkdirAll(client, dir); err != nil {
			return b.wrap(client, err, "create directory "+dir)
		}
		f, err = client.OpenFile(tmp, os.O_WRONLY|os.O_CREATE)
		return b.wrap(client, err, "create "+tmp)
	}
	for first := true; first || off < size; first = false {
		n := min(segment, size-off)
		err := b.retry(ctx, "save "+h.String(), func() error {
			if err := open(); err != nil {
				return err
			}
			if _, err := f.Seek(off, io.SeekStart); err != nil {
				closeFile()
				return b.wrap(client, err, "write "+h.String())
			}
			w, err := f.ReadFrom(io.NewSectionReader(ra, off, n))
			if err == nil && w != n {
				err = fmt.Errorf("wrote %d of %d bytes at %d", w, n, off)
			}
			if err != nil {
				closeFile()
				return b.wrap(client, err, "write "+h.String())
			}
			return nil
		})
		if err != nil {
			return err
		}
		off += n
	}
	err := b.retry(ctx, "save "+h.String(), func() error {
		if err := open(); err != nil {
			return err
		}
		if err := f.Sync(); err != nil && !isUnsupported(err) {
			closeFile()
			return b.wrap(client, err, "sync "+h.String())
		}
		err := f.Close()
		f = nil
		if err != nil {
			return b.wrap(client, err, "close "+h.String())
		}
		return nil
	})
	if err != nil {
		return err
	}
	tried := false
	err = b.retry(ctx, "save "+h.String(), func() error {
		c, err := b.conn(ctx)
		if err != nil {
			return err
		}
		err = b.rename(c, h, tmp, final)
		if err != nil && tried {
			// An earlier rename may have gone through, its answer lost.
			if _, terr := c.Stat(tmp); errors.Is(terr, fs.ErrNotExist) {
				if _, ferr := c.Stat(final); ferr == nil {
					return nil
				}
			}
		}
		tried = true
		return err
	})
	if err == nil {
		done = true
	}
	return err
}

func isUnsupported(err error) bool {
	var se *sftp.StatusError
	return errors.As(err, &se) && se.FxCode() == sftp.ErrSSHFxOpUnsupported
}

// rename moves tmp to final, never replacing a config.
func (b *Backend) rename(client *sftp.Client, h backend.Handle, tmp, final string) error {
	if !contentAddressed(h.Type) {
		// Plain SFTP rename fails when the target exists (OpenSSH links
		// and unlinks); check first for servers that might replace it.
		if _, err := client.Stat(final); err == nil {
			return fmt.Errorf("%s in %s: %w", h, b.location, backend.ErrExists)
		}
		if err := client.Rename(tmp, final); err != nil {
			if _, serr := client.Stat(final); serr == nil {
				return fmt.Errorf("%s in %s: %w", h, b.location, backend.ErrExists)
			}
			return b.wrap(client, err, "rename "+h.String())
		}
		return nil
	}
	if _, ok := client.HasExtension("posix-rename@openssh.com"); ok && !b.noPosixRename.Load() {
		err := client.PosixRename(tmp, final)
		if err == nil {
			return nil
		}
		if !errors.Is(err, fs.ErrPermission) && !isUnsupported(err) {
			return b.wrap(client, err, "rename "+h.String())
		}
		// A server that refuses it (sftp-server -P posix-rename, for
		// an append-only repository): plain rename, which never
		// replaces, does as well here.
		b.noPosixRename.Store(true)
	}
	if err := client.Rename(tmp, final); err != nil {
		if _, serr := client.Stat(final); serr == nil {
			return nil // same name, same content
		}
		return b.wrap(client, err, "rename "+h.String())
	}
	return nil
}

type fileReader struct {
	io.Reader
	f *sftp.File
}

func (r fileReader) Close() error { return r.f.Close() }

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	client, err := b.conn(ctx)
	if err != nil {
		return nil, err
	}
	f, err := client.Open(b.path(h))
	if err != nil {
		return nil, b.wrap(client, err, "open "+h.String())
	}
	if off > 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return nil, b.wrap(client, err, "seek "+h.String())
		}
	}
	// pkg/sftp's concurrent reads can end in io.EOF when the connection
	// drops mid-file, so the reader counts bytes against the size the
	// server gave when the file was opened: a short object is an error
	// (which the retry wrapper resumes), never a silently short read.
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, b.wrap(client, err, "stat "+h.String())
	}
	want := fi.Size() - off
	if length > 0 && length < want {
		want = length
	}
	if want < 0 {
		want = 0
	}
	return fileReader{&errReader{r: io.LimitReader(f, want), left: want, b: b, client: client, what: "read " + h.String()}, f}, nil
}

// errReader classifies read errors (and drops a dead connection).
type errReader struct {
	r      io.Reader
	left   int64
	b      *Backend
	client *sftp.Client
	what   string
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		err = fmt.Errorf("%d bytes short: %w", e.left, io.ErrUnexpectedEOF)
	}
	if err != nil && err != io.EOF {
		err = e.b.wrap(e.client, err, e.what)
	}
	return n, err
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	client, err := b.conn(ctx)
	if err != nil {
		return backend.Info{}, err
	}
	fi, err := client.Stat(b.path(h))
	if err != nil {
		return backend.Info{}, b.wrap(client, err, "stat "+h.String())
	}
	return backend.Info{Name: h.Name, Size: fi.Size(), ModTime: fi.ModTime()}, nil
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	client, err := b.conn(ctx)
	if err != nil {
		return err
	}
	dir := path.Join(b.root, string(t))
	if t != backend.PackFile {
		return b.listDir(ctx, client, dir, fn)
	}
	ents, err := client.ReadDirContext(ctx, dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return b.wrap(client, err, "list "+dir)
	}
	// The 256 fan-out directories are listed concurrently: one round trip
	// each would otherwise add up on a distant server.
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		sub := path.Join(dir, e.Name())
		g.Go(func() error {
			return b.listDir(gctx, client, sub, func(fi backend.Info) error {
				mu.Lock()
				defer mu.Unlock()
				return fn(fi)
			})
		})
	}
	return g.Wait()
}

func (b *Backend) listDir(ctx context.Context, client *sftp.Client, dir string, fn func(backend.Info) error) error {
	ents, err := client.ReadDirContext(ctx, dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return b.wrap(client, err, "list "+dir)
	}
	for _, e := range ents {
		if e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if err := fn(backend.Info{Name: e.Name(), Size: e.Size(), ModTime: e.ModTime()}); err != nil {
			return err
		}
	}
	return nil
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	client, err := b.conn(ctx)
	if err != nil {
		return err
	}
	return b.wrap(client, client.Remove(b.path(h)), "remove "+h.String())
}

// Close implements backend.Backend.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.client == nil {
		return nil
	}
	close(b.stop)
	err := b.client.Close()
	b.sc.Close()
	b.client, b.sc = nil, nil
	return err
}

// ListStray implements backend.StrayLister.
func (b *Backend) ListStray(ctx context.Context, fn func(backend.Stray) error) error {
	client, err := b.conn(ctx)
	if err != nil {
		return err
	}
	dirs := append([]string(nil), backend.StrayDirs...)
	if ents, err := client.ReadDirContext(ctx, path.Join(b.root, string(backend.PackFile))); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				dirs = append(dirs, string(backend.PackFile)+"/"+e.Name())
			}
		}
	}
	for _, d := range dirs {
		ents, err := client.ReadDirContext(ctx, path.Join(b.root, d))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return b.wrap(client, err, "list "+d)
		}
		for _, e := range ents {
			if e.IsDir() || !strings.HasPrefix(e.Name(), tmpPrefix) {
				continue
			}
			if err := fn(backend.Stray{Path: path.Join(d, e.Name()), Size: e.Size(), ModTime: e.ModTime()}); err != nil {
				return err
			}
		}
	}
	return nil
}

// RemoveStray implements backend.StrayLister.
func (b *Backend) RemoveStray(ctx context.Context, p string) error {
	if !strings.HasPrefix(path.Base(p), tmpPrefix) || strings.Contains(p, "..") {
		return fmt.Errorf("%q is not a temporary file of the repository", p)
	}
	client, err := b.conn(ctx)
	if err != nil {
		return err
	}
	return b.wrap(client, client.Remove(path.Join(b.root, p)), "remove "+p)
}
