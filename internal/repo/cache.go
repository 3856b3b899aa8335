package repo

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
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

// ownPacksFile journals the packs this machine uploaded, one hex name a
// line, each written before its upload starts: after a kill -9 the next
// backup knows which unindexed packs hold exactly what it wrote.
const ownPacksFile = "own-packs"

// RecordOwnPack notes a pack about to be uploaded. It reports failure: a
// pack it cannot record is still uploaded, but not adopted after a crash.
func (c *Cache) RecordOwnPack(id ID) error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	f, err := os.OpenFile(filepath.Join(c.dir, ownPacksFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteString(id.String() + "\n")
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
	c.mu.Lock()
	defer c.mu.Unlock()
	b, err := os.ReadFile(filepath.Join(c.dir, ownPacksFile))
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		if id, err := ParseID(strings.TrimSpace(line)); err == nil {
			out[id] = true
		}
	}
	return out
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
