package vdiotest

import (
	"bytes"
	"errors"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
)

// Updater is an image updated in place (qcow2.Updater, vmdk.Updater).
type Updater interface {
	WriteAt(p []byte, off int64) (int, error)
	Zero(off, n int64) error
	Sync() error
	Close() error
}

// Op is one write or zeroing of an update test.
type Op struct {
	Zero     bool
	Off, Len int64
	Data     []byte
}

// RandomOps returns n writes and zeroings over a disk of size bytes,
// sized up to three units of unit bytes, some aligned, some not. With
// distinct, no two ops touch the same unit.
func RandomOps(rng *mrand.Rand, size, unit int64, n int, distinct bool) []Op {
	var ops []Op
	used := map[int64]bool{}
	for len(ops) < n {
		off := rng.Int64N(size)
		l := 1 + rng.Int64N(3*unit)
		if rng.IntN(2) == 0 {
			off = off / unit * unit
			l = (1 + rng.Int64N(3)) * unit
		}
		l = min(l, size-off)
		if distinct {
			clash := false
			for u := off / unit; u <= (off+l-1)/unit; u++ {
				clash = clash || used[u]
			}
			if clash {
				continue
			}
			for u := off / unit; u <= (off+l-1)/unit; u++ {
				used[u] = true
			}
		}
		op := Op{Zero: rng.IntN(4) == 0, Off: off, Len: l}
		if !op.Zero {
			op.Data = make([]byte, l)
			for i := range op.Data {
				op.Data[i] = byte(rng.Uint32())
			}
			if rng.IntN(5) == 0 {
				clear(op.Data) // a write of zeros
			}
		}
		ops = append(ops, op)
	}
	return ops
}

// Apply does ops on u and on model (when not nil).
func Apply(t testing.TB, u Updater, model []byte, ops []Op) {
	t.Helper()
	for _, op := range ops {
		if op.Zero {
			if err := u.Zero(op.Off, op.Len); err != nil {
				t.Fatalf("zero %d at %d: %v", op.Len, op.Off, err)
			}
			if model != nil {
				clear(model[op.Off : op.Off+op.Len])
			}
			continue
		}
		if n, err := u.WriteAt(op.Data, op.Off); err != nil || n != len(op.Data) {
			t.Fatalf("write %d at %d: %d, %v", op.Len, op.Off, n, err)
		}
		if model != nil {
			copy(model[op.Off:], op.Data)
		}
	}
}

// QemuCheck runs qemu-img check on the image and returns its exit code
// (0 clean, 3 leaked clusters only) and output.
func QemuCheck(t testing.TB, path, format string) (int, string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "-f", format, path).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatalf("qemu-img check: %v", err)
	}
	return 0, string(out)
}

// QemuRaw returns the image's contents as qemu-img reads them.
func QemuRaw(t testing.TB, path, format string) []byte {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", format, "-O", "raw", path, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// QemuCompare fails unless qemu-img check finds the image clean and
// qemu-img compare finds it equal to model.
func QemuCompare(t testing.TB, path, format string, model []byte) {
	t.Helper()
	if code, out := QemuCheck(t, path, format); code != 0 {
		t.Fatalf("qemu-img check exit %d:\n%s", code, out)
	}
	raw := filepath.Join(t.TempDir(), "model.raw")
	if err := os.WriteFile(raw, model, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", format, "-F", "raw", path, raw).CombinedOutput(); err != nil {
		got := QemuRaw(t, path, format)
		for i := range got {
			if i < len(model) && got[i] != model[i] {
				t.Fatalf("qemu-img compare: %v\n%s\nfirst difference at %d", err, out, i)
			}
		}
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
}

// Dropping is a file that, after Budget writes, silently drops every
// write and sync: what the disk holds when the machine stops then.
type Dropping struct {
	*os.File
	Budget int
	// Offsets of the writes asked for, done or dropped.
	Offsets []int64
}

func (d *Dropping) WriteAt(p []byte, off int64) (int, error) {
	d.Offsets = append(d.Offsets, off)
	if d.Budget <= 0 {
		return len(p), nil
	}
	d.Budget--
	return d.File.WriteAt(p, off)
}

func (d *Dropping) Sync() error {
	if d.Budget <= 0 {
		return nil
	}
	return d.File.Sync()
}

func (d *Dropping) Truncate(n int64) error {
	if d.Budget <= 0 {
		return nil
	}
	return d.File.Truncate(n)
}

// OldOrNew fails unless each unit of got equals that of old or of new.
func OldOrNew(t testing.TB, got, old, new []byte, unit int64) {
	t.Helper()
	for o := int64(0); o < int64(len(got)); o += unit {
		e := min(o+unit, int64(len(got)))
		if !bytes.Equal(got[o:e], old[o:e]) && !bytes.Equal(got[o:e], new[o:e]) {
			t.Fatalf("after the crash, unit at %d is neither before nor after the interrupted Sync", o)
		}
	}
}

// NeedQemuImg fails the test without qemu-img.
func NeedQemuImg(t testing.TB) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Fatal("qemu-img not installed (Debian package qemu-utils)")
	}
}

// MemUpdate is an in-memory image file open for update.
type MemUpdate struct{ MemFile }

// ReadAt implements io.ReaderAt.
func (m *MemUpdate) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(m.B)) {
		return 0, io.EOF
	}
	n := copy(p, m.B[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Sync does nothing: the file is in memory.
func (m *MemUpdate) Sync() error { return nil }

// Stat returns the file's size.
func (m *MemUpdate) Stat() (os.FileInfo, error) { return memInfo(len(m.B)), nil }

type memInfo int64

func (s memInfo) Name() string       { return "mem" }
func (s memInfo) Size() int64        { return int64(s) }
func (s memInfo) Mode() os.FileMode  { return 0o600 }
func (s memInfo) ModTime() time.Time { return time.Time{} }
func (s memInfo) IsDir() bool        { return false }
func (s memInfo) Sys() any           { return nil }

// SizedUpdater is an Updater of a disk of Size bytes.
type SizedUpdater interface {
	Updater
	Size() int64
}

// FuzzUpdate is the fuzz target of an updater: it opens an input
// (FuzzFile, read whole) for update with open, does a few writes and
// zeroings that at seeds, and syncs; the result must open for update
// again and read back (through read, the format's reader) what was
// written.
func FuzzUpdate(f *testing.F, open func(*MemUpdate) (SizedUpdater, error), read func([]byte) (io.ReaderAt, error)) {
	f.Fuzz(func(t *testing.T, in []byte, at uint64) {
		img := fuzzimg.Decode(in, FuzzMaxFile, FuzzMaxFile)
		b := make([]byte, img.Size())
		img.ReadAt(b, 0)
		m := &MemUpdate{MemFile{B: b}}
		u, err := open(m)
		if err != nil || u.Size() == 0 {
			return
		}
		n := 6
		if u.Size() < 64*4096 {
			n = 1
		}
		ops := RandomOps(mrand.New(mrand.NewPCG(at, 1)), u.Size(), 4096, n, true)
		Apply(t, u, nil, ops)
		if err := u.Close(); err != nil {
			t.Fatalf("sync: %v", err)
		}
		if _, err := open(m); err != nil {
			t.Fatalf("reopen after a sync: %v", err)
		}
		r, err := read(m.B)
		if err != nil {
			t.Fatalf("read after a sync: %v", err)
		}
		for _, op := range ops {
			got := make([]byte, op.Len)
			if k, err := r.ReadAt(got, op.Off); int64(k) != op.Len {
				t.Fatalf("read back %d at %d: %d, %v", op.Len, op.Off, k, err)
			}
			want := op.Data
			if op.Zero {
				want = make([]byte, op.Len)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%d bytes at %d read back wrong", op.Len, op.Off)
			}
		}
	})
}

// UpdateCorpus checks that every seed of the committed corpus of
// FuzzUpdate, testdata/fuzz/FuzzUpdate, opens for update; when
// SAUVE_WRITE_CORPUS is set, it first rewrites the seeds from the image
// files seeds returns.
func UpdateCorpus(t *testing.T, open func(*MemUpdate) (SizedUpdater, error), seeds func() map[string][]byte) {
	if os.Getenv("SAUVE_WRITE_CORPUS") != "" {
		in := map[string][][]byte{}
		for name, img := range seeds() {
			in[name] = [][]byte{fuzzimg.Encode(img)}
		}
		WriteCorpus(t, "FuzzUpdate", in, "uint64(5000)")
	}
	for name, args := range Corpus(t, "FuzzUpdate") {
		if found.MatchString(name) {
			continue
		}
		img := fuzzimg.Decode(args[0], FuzzMaxFile, FuzzMaxFile)
		b := make([]byte, img.Size())
		img.ReadAt(b, 0)
		if _, err := open(&MemUpdate{MemFile{B: b}}); err != nil {
			t.Errorf("seed %s: %v", name, err)
		}
	}
}
