package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"

	"golang.org/x/term"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/location"
	"github.com/sauve-backup/sauve/internal/backend/retry"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

// defaultRepo is the repository used when neither --repo nor SAUVE_REPO
// names one: a folder under the user's data directory.
func defaultRepo() (string, error) {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "sauve", "repo"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", usageError{errors.New("no repository given: use --repo or set SAUVE_REPO")}
	}
	return filepath.Join(home, ".local", "share", "sauve", "repo"), nil
}

// openBackend turns a repository location into a backend (package
// location parses it; remote backends come wrapped in retries).
func (g *globals) openBackend() (backend.Backend, error) {
	loc := g.repo
	if loc == "" {
		d, err := defaultRepo()
		if err != nil {
			return nil, err
		}
		loc, g.repo, g.usingDefault = d, d, true
	}
	be, kind, err := location.Open(context.Background(), loc, location.Options{
		S3Endpoint: g.s3Endpoint, S3PathStyle: g.s3PathStyle, Connections: g.connections, IdleTimeout: g.netTimeout,
		Retry: retry.Options{MaxDelay: g.retryDelay, Warn: func(f string, a ...any) { g.warnf(f, a...) }},
	})
	if err != nil {
		return nil, err
	}
	if g.connections <= 0 {
		g.connections = location.DefaultConnections(kind)
	}
	return be, nil
}

// configDir is where key files live by default.
func configDir() (string, error) {
	if d := os.Getenv("XDG_CONFIG_HOME"); d != "" {
		return filepath.Join(d, "sauve"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("cannot find a home directory for the key file (set XDG_CONFIG_HOME or use --key): %w", err)
	}
	return filepath.Join(home, ".config", "sauve"), nil
}

// defaultKeyPath is the key file path tied to a repository ID.
func defaultKeyPath(repoID string) (string, error) {
	d, err := configDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(d, "keys", repoID+".key"), nil
}

func (g *globals) cacheBase() string {
	if g.noCache {
		return ""
	}
	if g.cacheDir != "" {
		return g.cacheDir
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "sauve")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "sauve")
	}
	return ""
}

// passphrase returns the passphrase from the environment or the terminal.
// confirm asks twice (for new passphrases).
func passphrase(prompt string, confirm bool) ([]byte, error) {
	return passphraseFrom("SAUVE_PASSPHRASE", prompt, confirm)
}

// passphraseFrom is passphrase read from the variables env and env_FILE
// (SAUVE_FROM_PASSPHRASE for the source of a copy).
func passphraseFrom(env, prompt string, confirm bool) ([]byte, error) {
	if p, ok := os.LookupEnv(env); ok {
		return []byte(p), nil
	}
	if f := os.Getenv(env + "_FILE"); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("passphrase file: %w", err)
		}
		return []byte(strings.TrimRight(string(b), "\r\n")), nil
	}
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil || !term.IsTerminal(int(tty.Fd())) {
		if tty != nil {
			tty.Close()
		}
		return nil, nil
	}
	defer tty.Close()
	read := func(p string) ([]byte, error) {
		fmt.Fprint(tty, p)
		b, err := term.ReadPassword(int(tty.Fd()))
		fmt.Fprintln(tty)
		return b, err
	}
	p1, err := read(prompt)
	if err != nil {
		return nil, fmt.Errorf("read passphrase: %w", err)
	}
	if confirm && len(p1) > 0 {
		p2, err := read("Repeat passphrase: ")
		if err != nil {
			return nil, fmt.Errorf("read passphrase: %w", err)
		}
		if string(p1) != string(p2) {
			return nil, errors.New("the passphrases do not match")
		}
	}
	return p1, nil
}

// keyNames are the flag and variables a repository's key is given with:
// the target's (--key), or the source's of a copy (--from-key).
type keyNames struct{ flag, keyVar, passVar string }

var (
	targetKeyNames = keyNames{"--key", "SAUVE_KEY", "SAUVE_PASSPHRASE"}
	sourceKeyNames = keyNames{"--from-key", "SAUVE_FROM_KEY", "SAUVE_FROM_PASSPHRASE"}
)

// names are the flag and variables of g's key.
func (g *globals) names() keyNames {
	if g.keyNames.flag == "" {
		return targetKeyNames
	}
	return g.keyNames
}

// loadKeys finds and decodes the key for the repository with ID repoID.
func (g *globals) loadKeys(repoID string) (*crypto.Keys, string, error) {
	names := g.names()
	path := g.keyFile
	if path == "" {
		p, err := defaultKeyPath(repoID)
		if err != nil {
			return nil, "", err
		}
		path = p
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if g.keyFile == "" {
				return nil, path, fmt.Errorf("no key for repository %s: expected %s; give the key file with %s or %s", repoID, path, names.flag, names.keyVar)
			}
			return nil, path, fmt.Errorf("key file %s does not exist", path)
		}
		return nil, path, fmt.Errorf("read key file: %w", err)
	}
	info, err := crypto.InspectKeyFile(data)
	if err != nil {
		return nil, path, fmt.Errorf("key file %s: %w", path, err)
	}
	if info.Repository != repoID && info.Parent != repoID {
		return nil, path, fmt.Errorf("key file %s belongs to repository %s, not to this repository (%s)", path, info.Repository, repoID)
	}
	keys, err := crypto.DecodeKeyFile(data, func() ([]byte, error) {
		return passphraseFrom(names.passVar, fmt.Sprintf("Passphrase for key %s: ", path), false)
	})
	if err != nil {
		if errors.Is(err, crypto.ErrNeedPassphrase) {
			return nil, path, fmt.Errorf("key file %s is protected by a passphrase: set %s or run from a terminal", path, names.passVar)
		}
		return nil, path, fmt.Errorf("key file %s: %w", path, err)
	}
	return keys, path, nil
}

// openRepo opens the repository with its key and, when loadIndex is set,
// its index. With create set, the default repository is created on first
// use (a repository named with --repo must be made with 'sauve init').
func (g *globals) openRepo(ctx context.Context, loadIndex bool, create ...bool) (*repo.Repository, error) {
	be, err := g.openBackend()
	if err != nil {
		return nil, err
	}
	cfg, err := repo.ReadConfig(ctx, be)
	if errors.Is(err, repo.ErrNoRepository) && g.usingDefault && len(create) > 0 && create[0] {
		info, ierr := g.initRepo(ctx, be, 0, 0)
		if ierr != nil {
			return nil, ierr
		}
		if !g.quiet {
			fmt.Fprintf(g.stderr, "sauve: created the default repository %s (key %s)\n", be.Location(), info.keyPath)
			if len(info.passphrase) == 0 {
				fmt.Fprintf(g.stderr, "sauve: the key has no passphrase (set SAUVE_PASSPHRASE before the first backup for one; 'sauve key passwd' adds one later); keep a copy of it elsewhere\n")
			}
		}
		cfg, err = repo.ReadConfig(ctx, be)
	}
	if err != nil {
		if errors.Is(err, repo.ErrNoRepository) && g.usingDefault {
			return nil, fmt.Errorf("%w; or name one with --repo or SAUVE_REPO", err)
		}
		return nil, err
	}
	keys, _, err := g.loadKeys(cfg.ID)
	if err != nil {
		return nil, err
	}
	if keys.Namespace != "" {
		// An isolated writer's key: its repository is its namespace.
		if be, err = g.namespaceBackend(keys.Namespace); err != nil {
			return nil, err
		}
	}
	return g.openWith(ctx, be, keys, loadIndex)
}

// openWith opens the repository in be with keys.
func (g *globals) openWith(ctx context.Context, be backend.Backend, keys *crypto.Keys, loadIndex bool) (*repo.Repository, error) {
	r, err := repo.Open(ctx, be, keys, repo.Options{
		CacheDir:    g.cacheBase(),
		Connections: g.connections,
		Compression: g.level,
		Warn:        func(f string, a ...any) { g.warnf(f, a...) },
		Program:     "sauve " + Version,
	})
	if err != nil {
		return nil, err
	}
	if loadIndex {
		if err := r.LoadIndex(ctx); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// namespaceBackend opens the backend of isolated namespace ns of the
// repository at --repo.
func (g *globals) namespaceBackend(ns string) (backend.Backend, error) {
	if err := crypto.ValidNamespace(ns); err != nil {
		return nil, err
	}
	loc, err := location.Sub(g.repo, "isolated/"+ns)
	if err != nil {
		return nil, err
	}
	sub := *g
	sub.repo = loc
	return sub.openBackend()
}

// repoSet is a repository and, for its owner, its isolated namespaces:
// every command that reads snapshots reads them all.
type repoSet struct {
	main *repo.Repository
	all  []*repo.Repository // main first
}

// openSet opens the repository and, with the owner's key, every isolated
// namespace the owner's ledger records.
func (g *globals) openSet(ctx context.Context, loadIndex bool) (*repoSet, error) {
	r, err := g.openRepo(ctx, loadIndex)
	if err != nil {
		return nil, err
	}
	set := &repoSet{main: r, all: []*repo.Repository{r}}
	if !r.Keys().IsOwner() || r.Keys().Namespace != "" {
		return set, nil
	}
	led, err := r.Ledger(ctx)
	if err != nil {
		return nil, err
	}
	for _, ns := range led.Namespaces {
		nr, err := g.openNamespace(ctx, r.Keys(), ns, loadIndex)
		if err != nil {
			return nil, fmt.Errorf("isolated namespace %s: %w", ns, err)
		}
		set.all = append(set.all, nr)
	}
	return set, nil
}

// openNamespace opens namespace ns with the owner's keys derived for it.
func (g *globals) openNamespace(ctx context.Context, owner *crypto.Keys, ns string, loadIndex bool) (*repo.Repository, error) {
	keys, err := owner.Isolated(ns)
	if err != nil {
		return nil, err
	}
	be, err := g.namespaceBackend(ns)
	if err != nil {
		return nil, err
	}
	return g.openWith(ctx, be, keys, loadIndex)
}

// snapshots loads the snapshots of every repository of the set, oldest
// first, and says which repository each is in.
func (g *globals) setSnapshots(ctx context.Context, set *repoSet) ([]*repo.Snapshot, map[*repo.Snapshot]*repo.Repository, error) {
	var all []*repo.Snapshot
	in := map[*repo.Snapshot]*repo.Repository{}
	for _, r := range set.all {
		snaps, err := g.snapshots(ctx, r)
		if err != nil {
			return nil, nil, err
		}
		for _, sn := range snaps {
			in[sn] = r
		}
		all = append(all, snaps...)
	}
	sort.SliceStable(all, func(i, j int) bool {
		if !all[i].Time.Equal(all[j].Time) {
			return all[i].Time.Before(all[j].Time)
		}
		return all[i].ID.String() < all[j].ID.String()
	})
	return all, in, nil
}

// writeKeyFile writes a key file with mode 0600, refusing to overwrite.
func writeKeyFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create key directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("key file %s exists already: refusing to overwrite it", path)
		}
		return fmt.Errorf("write key file: %w", err)
	}
	w := bufio.NewWriter(f)
	w.Write(data)
	w.WriteString("\n")
	if err := w.Flush(); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write key file %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write key file %s: %w", path, err)
	}
	return f.Close()
}

// printSetJSON prints the report of the repository, with those of its
// isolated namespaces under "namespaces" when it has any.
func (g *globals) printSetJSON(set *repoSet, reports []any) error {
	if len(reports) == 1 {
		return g.printJSON(reports[0])
	}
	ns := map[string]any{}
	for i, r := range set.all[1:] {
		ns[r.Keys().Namespace] = reports[i+1]
	}
	return g.printJSON(map[string]any{"repository": reports[0], "namespaces": ns})
}

// eachRepo runs fn on the repository and then on each of its isolated
// namespaces, heading the human output of each namespace with its name.
func (g *globals) eachRepo(set *repoSet, fn func(r *repo.Repository) error) error {
	for i, r := range set.all {
		if i > 0 {
			g.printf("\nisolated namespace %s:\n", r.Keys().Namespace)
		}
		if err := fn(r); err != nil {
			return namespaceErr(r, err)
		}
	}
	return nil
}

// namespaceErr names the namespace an error happened in.
func namespaceErr(r *repo.Repository, err error) error {
	if ns := r.Keys().Namespace; ns != "" {
		return fmt.Errorf("isolated namespace %s: %w", ns, err)
	}
	return err
}

// countMeter starts a progress bar fed by a (done, total) callback, as
// check, repair and verification report progress; stop it when done.
func (g *globals) countMeter(label string, enabled bool) (progress func(done, total int), stop func()) {
	var done, total atomic.Int64
	m := startMeter(g.stderr, enabled && g.showProgress(), meterSource{label: label, total: total.Load, current: done.Load})
	return func(d, t int) {
		done.Store(int64(d)) // read by the meter's goroutine
		total.Store(int64(t))
	}, m.Stop
}
