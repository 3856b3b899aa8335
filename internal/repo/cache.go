package repo

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Cache keeps copies of a repository's index objects, manifests and chunk
// lists on local disk, so that commands against a remote repository fetch
// only what they have not seen. It holds objects as stored (sealed), and
// every read is verified like a read from the backend, so a damaged cache
// costs a download, never a wrong result.
type Cache struct {
	dir string
	mu  sync.Mutex // the own-packs journal
}

// Cache kinds.
const (
	cacheIndex     = "index"
	cacheSnapshots = "snapshots"
	cacheBlobs     = "blobs"
)

// OpenCache returns the cache for repository id under base.
func OpenCache(base, id string) (*Cache, error) {
	if err := ValidRepoID(id); err != nil {
		return nil, err
	}
	dir := filepath.Join(base, id)
	for _, k := range []string{cacheIndex, cacheSnapshots, cacheBlobs} {
		if err := os.MkdirAll(filepath.Join(dir, k), 0o700); err != nil {
			return nil, err
		}
	}
	// CACHEDIR.TAG keeps backup tools from backing the cache up.
	tag := filepath.Join(base, "CACHEDIR.TAG")
	if _, err := os.Stat(tag); errors.Is(err, fs.ErrNotExist) {
		_ = os.WriteFile(tag, []byte("Signature: 8a477f597d28d172789f06886806bc55\n# sauve cache; see https://bford.info/cachedir/\n"), 0o600)
	}
	return &Cache{dir: dir}, nil
}

func (c *Cache) path(kind, name string) string {
	if kind == cacheBlobs && len(name) > 2 {
		return filepath.Join(c.dir, kind, name[:2], name)
	}
	return filepath.Join(c.dir, kind, name)
}

// Get returns a cached object.
func (c *Cache) Get(kind, name string) ([]byte, bool) {
	if c == nil {
		return nil, false
	}
	b, err := os.ReadFile(c.path(kind, name))
	return b, err == nil
}

// Put stores an object; failures are ignored (a cache is an optimisation).
func (c *Cache) Put(kind, name string, data []byte) {
	if c == nil {
		return
	}
	p := c.path(kind, name)
	dir := filepath.Dir(p)
	_ = os.MkdirAll(dir, 0o700)
	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(dir, ".tmp-"+hex.EncodeToString(rnd[:]))
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		os.Remove(tmp)
		return
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
	}
}

// Remove drops an object.
func (c *Cache) Remove(kind, name string) {
	if c != nil {
		os.Remove(c.path(kind, name))
	}
}

// List returns the names cached of a kind (not blobs).
func (c *Cache) List(kind string) []string {
	if c == nil {
		return nil
	}
	ents, _ := os.ReadDir(filepath.Join(c.dir, kind))
	var names []string
	for _, e := range ents {
		if !e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			names = append(names, e.Name())
		}
	}
	return names
}

// ownPacksFile journals the packs this machine uploaded, a line each
// ("<hex name> <unix seconds>"; older sauve wrote the name alone), each
// written before its upload starts: after a kill -9 the next backup knows
// which unindexed packs hold exactly what it wrote. Processes sharing the
// cache lock the file (flock) to append and to compact it.
const ownPacksFile = "own-packs"

// ownPackGrace is how long a journalled pack that is not stored is kept
// in the journal: its upload may still be running in another process.
const ownPackGrace = 7 * 24 * time.Hour

// RecordOwnPack notes a pack about to be uploaded. It reports failure: a
// pack it cannot record is still uploaded, but not adopted after a crash.
func (c *Cache) RecordOwnPack(id ID) error {
	if c == nil {
		return nil
	}
	return c.withOwnPacks(func(f *os.File) error {
		_, err := f.WriteString(fmt.Sprintf("%s %d\n", id, time.Now().Unix()))
		return err
	})
}

// withOwnPacks runs fn with the journal open for appending and locked.
func (c *Cache) withOwnPacks(fn func(f *os.File) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	f, err := os.OpenFile(filepath.Join(c.dir, ownPacksFile), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	err = fn(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// OwnPacks returns the packs RecordOwnPack noted.
func (c *Cache) OwnPacks() map[ID]bool {
	out := map[ID]bool{}
	if c == nil {
		return out
	}
	_ = c.withOwnPacks(func(f *os.File) error {
		for id := range parseOwnPacks(f) {
			out[id] = true
		}
		return nil
	})
	return out
}

// parseOwnPacks reads the journal: pack → when it was recorded (zero for
// lines of older versions).
func parseOwnPacks(f *os.File) map[ID]time.Time {
	out := map[ID]time.Time{}
	b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<62))
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		name, when, _ := strings.Cut(strings.TrimSpace(line), " ")
		id, err := ParseID(name)
		if err != nil {
			continue
		}
		var t time.Time
		if sec, err := strconv.ParseInt(when, 10, 64); err == nil {
			t = time.Unix(sec, 0)
		}
		if t.After(out[id]) || out[id].IsZero() {
			out[id] = t
		}
	}
	return out
}

// CompactOwnPacks rewrites the journal without the packs that need no
// adoption any more: those indexed, and those not stored (stored reports
// false) recorded longer ago than a week. A journal that only grew would
// cost every backup a read of a line per pack this machine ever wrote.
func (c *Cache) CompactOwnPacks(indexed, stored func(ID) bool, now time.Time) error {
	if c == nil {
		return nil
	}
	return c.withOwnPacks(func(f *os.File) error {
		all := parseOwnPacks(f)
		var b strings.Builder
		dropped := 0
		for id, t := range all {
			if indexed(id) || (!stored(id) && now.Sub(t) > ownPackGrace) {
				dropped++
				continue
			}
			fmt.Fprintf(&b, "%s %d\n", id, t.Unix())
		}
		if dropped == 0 {
			return nil
		}
		// Truncating in place under the lock: another process appends only
		// while holding it, so nothing written meanwhile is lost.
		if err := f.Truncate(0); err != nil {
			return err
		}
		_, err := f.WriteString(b.String())
		return err
	})
}

// cachePrunes holds a file per prune this machine runs, named by its
// session, so that the next prune knows a session left by a prune that
// was killed here (kill -9, a crash): such a session stays live for its
// lifetime, and would otherwise keep every prune off for hours.
const cachePrunes = "prunes"

// RecordPrune notes that this process runs prune session id; the record
// goes when the prune ends (ForgetPrune).
func (c *Cache) RecordPrune(id string) {
	if c == nil {
		return
	}
	os.MkdirAll(filepath.Join(c.dir, cachePrunes), 0o700)
	c.Put(cachePrunes, id, []byte(processTag(os.Getpid())))
}

// ForgetPrune removes the record of a prune session that ended.
func (c *Cache) ForgetPrune(id string) { c.Remove(cachePrunes, id) }

// DeadPrunes returns the prune sessions this machine recorded whose
// process is gone.
func (c *Cache) DeadPrunes() map[string]bool {
	dead := map[string]bool{}
	for _, name := range c.List(cachePrunes) {
		b, ok := c.Get(cachePrunes, name)
		if !ok {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err != nil || processTag(pid) != string(b) {
			dead[name] = true
		}
	}
	return dead
}

// processTag names a process so that a reused PID, or one from before a
// reboot, does not pass for it: PID, boot ID and start time.
func processTag(pid int) string {
	boot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// Field 22 (start time) follows the command name in parentheses.
	rest := string(stat)
	if i := strings.LastIndexByte(rest, ')'); i >= 0 {
		rest = rest[i+1:]
	}
	f := strings.Fields(rest)
	start := ""
	if len(f) > 19 {
		start = f[19]
	}
	return fmt.Sprintf("%d %s %s", pid, strings.TrimSpace(string(boot)), start)
}

// cacheReadMaps holds the read maps of the backups this machine made
// (backup.ReadMapWriter), one per snapshot and disk: hints for the next
// backup of the disk, never read as repository data.
const cacheReadMaps = "readmaps"

// ReadMapPath is where the read map of disk in snapshot sn is kept, and
// the folder it is in (made if missing); "" without a cache.
func (c *Cache) ReadMapPath(sn ID, disk string) (path, dir string) {
	if c == nil {
		return "", ""
	}
	dir = filepath.Join(c.dir, cacheReadMaps)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", ""
	}
	// By a hash of the name: a disk's name may hold any byte.
	h := sha256.Sum256([]byte(disk))
	return filepath.Join(dir, sn.String()+"-"+hex.EncodeToString(h[:16])), dir
}

// LocalCache returns the repository's local cache, nil without one.
func (r *Repository) LocalCache() *Cache { return r.cache }
