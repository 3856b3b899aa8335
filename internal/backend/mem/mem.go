// Package mem is a backend that keeps a repository in memory: for fast
// unit tests of the repository and the pipelines, in addition to the real
// servers, never instead of them. Objects are copied in and out, so a
// caller cannot change what is stored by keeping a slice; Damage and
// Truncate let tests play storage that loses or corrupts bytes, and
// SetClock a storage clock that tests move by hand.
package mem

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
)

// Backend is an in-memory repository, safe for concurrent use.
type Backend struct {
	mu      sync.RWMutex
	objects map[string]object // by Handle.Path()
	now     func() time.Time  // the storage's clock
	// Fail, when set, is called before every operation; a non-nil
	// result is returned as that operation's error.
	Fail func(op string, h backend.Handle) error
}

// object is a stored object and when it was stored.
type object struct {
	data []byte
	mod  time.Time
}

// New returns an empty backend whose clock is the system's.
func New() *Backend { return &Backend{objects: map[string]object{}, now: time.Now} }

// SetClock replaces the storage's clock, which stamps each object saved
// (Info.ModTime): tests move it to play a storage whose time runs apart
// from the writer's.
func (b *Backend) SetClock(now func() time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.now = now
}

// info describes o under name.
func (o object) info(name string) backend.Info {
	return backend.Info{Name: name, Size: int64(len(o.data)), ModTime: o.mod}
}

// Location implements backend.Backend.
func (b *Backend) Location() string { return "mem:" }

func (b *Backend) fail(op string, h backend.Handle) error {
	if b.Fail != nil {
		return b.Fail(op, h)
	}
	return nil
}

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, h backend.Handle, rd io.ReadSeeker, size int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := b.fail("save", h); err != nil {
		return err
	}
	data, err := io.ReadAll(rd)
	if err != nil {
		return fmt.Errorf("save %s: %w", h, err)
	}
	if int64(len(data)) != size {
		return fmt.Errorf("save %s: read %d bytes, expected %d", h, len(data), size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.objects[h.Path()]; ok && h.Type == backend.ConfigFile {
		return fmt.Errorf("save %s: %w", h, backend.ErrExists)
	}
	b.objects[h.Path()] = object{data, b.now()}
	return nil
}

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, h backend.Handle, off, length int64) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := b.fail("load", h); err != nil {
		return nil, err
	}
	b.mu.RLock()
	o, ok := b.objects[h.Path()]
	b.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("load %s: %w", h, backend.ErrNotExist)
	}
	data := o.data
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	end := int64(len(data))
	if length > 0 && off+length < end {
		end = off + length
	}
	return io.NopCloser(bytes.NewReader(bytes.Clone(data[off:end]))), nil
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if err := b.fail("stat", h); err != nil {
		return backend.Info{}, err
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	o, ok := b.objects[h.Path()]
	if !ok {
		return backend.Info{}, fmt.Errorf("stat %s: %w", h, backend.ErrNotExist)
	}
	return o.info(h.Name), nil
}

// List implements backend.Backend, in name order.
func (b *Backend) List(ctx context.Context, t backend.FileType, fn func(backend.Info) error) error {
	if err := b.fail("list", backend.Handle{Type: t}); err != nil {
		return err
	}
	b.mu.RLock()
	var infos []backend.Info
	for _, name := range b.names(t) {
		infos = append(infos, b.objects[backend.Handle{Type: t, Name: name}.Path()].info(name))
	}
	b.mu.RUnlock()
	for _, fi := range infos {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(fi); err != nil {
			return err
		}
	}
	return nil
}

// names returns the names of objects of kind t, sorted; b.mu is held.
func (b *Backend) names(t backend.FileType) []string {
	var out []string
	prefix := string(t) + "/"
	for p := range b.objects {
		if len(p) > len(prefix) && p[:len(prefix)] == prefix {
			name := p[len(prefix):]
			if i := bytes.LastIndexByte([]byte(name), '/'); i >= 0 {
				name = name[i+1:]
			}
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	if err := b.fail("remove", h); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.objects[h.Path()]; !ok {
		return fmt.Errorf("remove %s: %w", h, backend.ErrNotExist)
	}
	delete(b.objects, h.Path())
	return nil
}

// Close implements backend.Backend.
func (b *Backend) Close() error { return nil }

// Names returns the names of the stored objects of kind t, sorted.
func (b *Backend) Names(t backend.FileType) []string {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.names(t)
}

// Get returns a copy of an object's bytes.
func (b *Backend) Get(h backend.Handle) ([]byte, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	o, ok := b.objects[h.Path()]
	return bytes.Clone(o.data), ok
}

// Put stores bytes under a name as they are, whatever they hold (a test
// playing a hostile writer, or damaged storage).
func (b *Backend) Put(h backend.Handle, data []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.objects[h.Path()] = object{bytes.Clone(data), b.now()}
}

// Damage flips the bits of the byte at off of an object.
func (b *Backend) Damage(h backend.Handle, off int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if o, ok := b.objects[h.Path()]; ok && off < int64(len(o.data)) {
		o.data[off] ^= 0xff
	}
}

// Truncate cuts an object to n bytes.
func (b *Backend) Truncate(h backend.Handle, n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if o, ok := b.objects[h.Path()]; ok && n < int64(len(o.data)) {
		o.data = o.data[:n]
		b.objects[h.Path()] = o
	}
}
