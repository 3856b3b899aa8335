package vdiotest

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// InPlaceUpdater is a format's in-place updater.
type InPlaceUpdater interface {
	WriteAt(p []byte, off int64) (int, error)
	Zero(off, n int64) error
	Sync() error
	Close() error
}

// InPlace describes a format's updater to the in-place tests.
type InPlace struct {
	Format string // qemu-img's name of the format
	Check  bool   // qemu-img check supports the format
	Size   int64  // virtual size of the test disk
	Block  int64  // the format's allocation unit, to aim writes at
	Create func(f *os.File, size int64) (InPlaceUpdater, error)
	Open   func(f *os.File) (InPlaceUpdater, error)
}

// model is the disk the image must hold, and the ranges changed since
// the last Sync (unknown after a crash).
type model struct {
	disk    []byte
	pending [][2]int64
}

func randomOps(r *rand.Rand, c InPlace, u InPlaceUpdater, m *model, ops int) error {
	for range ops {
		// Aim at a few blocks, so that writes hit allocated blocks, new
		// ones, and block boundaries.
		off := r.Int64N(c.Size)
		if r.IntN(2) == 0 {
			off = off / c.Block * c.Block
			if r.IntN(2) == 0 && off >= 512 {
				off -= 512
			}
		}
		n := min(c.Size-off, 1+r.Int64N(2*c.Block))
		switch r.IntN(5) {
		case 0:
			if err := u.Zero(off, n); err != nil {
				return err
			}
			clear(m.disk[off : off+n])
		case 1:
			// Zeros written as data.
			if _, err := u.WriteAt(make([]byte, n), off); err != nil {
				return err
			}
			clear(m.disk[off : off+n])
		default:
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(r.Uint32() | 1)
			}
			if _, err := u.WriteAt(p, off); err != nil {
				return err
			}
			copy(m.disk[off:], p)
		}
		m.pending = append(m.pending, [2]int64{off, n})
	}
	return nil
}

// qemuValid checks img with qemu-img check (where supported) and
// compares it with the model.
func qemuValid(t *testing.T, c InPlace, img string, disk []byte, what string) {
	t.Helper()
	if c.Check {
		if out, err := exec.Command("qemu-img", "check", "-f", c.Format, img).CombinedOutput(); err != nil {
			t.Fatalf("%s: qemu-img check: %v\n%s", what, err, out)
		}
	}
	if disk == nil {
		return
	}
	raw := filepath.Join(filepath.Dir(img), "model.raw")
	if err := os.WriteFile(raw, disk, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", c.Format, "-F", "raw", img, raw).CombinedOutput(); err != nil {
		t.Fatalf("%s: qemu-img compare with the model: %v\n%s", what, err, out)
	}
}

// TestInPlace runs random writes and zeroings through a format's
// updater against an in-memory model: after every Sync qemu-img finds
// the image valid and equal to the model, and reopening continues.
func TestInPlace(t *testing.T, c InPlace) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	img := filepath.Join(t.TempDir(), "t."+c.Format)
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	u, err := c.Create(f, c.Size)
	if err != nil {
		t.Fatal(err)
	}
	m := &model{disk: make([]byte, c.Size)}
	qemuValid(t, c, img, m.disk, "created")
	r := rand.New(rand.NewPCG(uint64(c.Size), 1))
	for round := range 4 {
		for range 3 {
			if err := randomOps(r, c, u, m, 12); err != nil {
				t.Fatal(err)
			}
			if err := u.Sync(); err != nil {
				t.Fatal(err)
			}
			qemuValid(t, c, img, m.disk, "after a sync")
		}
		if err := u.Close(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if f, err = os.OpenFile(img, os.O_RDWR, 0); err != nil {
			t.Fatal(err)
		}
		if u, err = c.Open(f); err != nil {
			t.Fatalf("reopen after round %d: %v", round, err)
		}
	}
	u.Close()
	f.Close()
}

// DroppingFile is a file that loses every write, truncation and sync after the first
// budget writes: a power cut at that point, all earlier writes durable.
type DroppingFile struct {
	*os.File
	budget int
}

func (d *DroppingFile) WriteAt(p []byte, off int64) (int, error) {
	if d.budget <= 0 {
		return len(p), nil
	}
	d.budget--
	return d.File.WriteAt(p, off)
}

func (d *DroppingFile) Truncate(n int64) error {
	if d.budget <= 0 {
		return nil
	}
	return d.File.Truncate(n)
}

func (d *DroppingFile) Sync() error {
	if d.budget <= 0 {
		return nil
	}
	return d.File.Sync()
}

// TestCrash cuts the power at several points of a batch of writes and
// its Sync: the image is still valid (qemu-img), reopens, and once the
// ranges of the lost batch are written again it equals the model.
// open opens the image for updating through a DroppingFile.
func TestCrash(t *testing.T, c InPlace, open func(f *DroppingFile) (InPlaceUpdater, error)) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	// A run without a cut counts the batch's writes; the cuts fall at its
	// start, its middle, and each of its last writes (the metadata).
	total := crashRun(t, c, open, 1<<30)
	cuts := []int{0, 1, 2, total / 4, total / 2}
	for i := max(0, total-6); i <= total; i++ {
		cuts = append(cuts, i)
	}
	for _, budget := range cuts {
		crashRun(t, c, open, budget)
	}
}

// crashRun runs a batch cut after budget writes and returns how many
// writes the batch made.
func crashRun(t *testing.T, c InPlace, open func(f *DroppingFile) (InPlaceUpdater, error), budget int) int {
	t.Helper()
	img := filepath.Join(t.TempDir(), "t."+c.Format)
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u, err := c.Create(f, c.Size)
	if err != nil {
		t.Fatal(err)
	}
	m := &model{disk: make([]byte, c.Size)}
	r := rand.New(rand.NewPCG(uint64(c.Size), 2))
	if err := randomOps(r, c, u, m, 10); err != nil {
		t.Fatal(err)
	}
	if err := u.Sync(); err != nil {
		t.Fatal(err)
	}
	m.pending = nil
	// The batch the power cut interrupts.
	d := &DroppingFile{File: f, budget: budget}
	w, err := open(d)
	if err != nil {
		t.Fatal(err)
	}
	if err := randomOps(r, c, w, m, 10); err != nil {
		t.Fatal(err)
	}
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	used := budget - max(d.budget, 0)
	f.Close()
	if f, err = os.OpenFile(img, os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	what := fmt.Sprintf("power cut after %d writes of the batch", budget)
	if u, err = c.Open(f); err != nil {
		t.Fatalf("%s: reopen: %v", what, err)
	}
	qemuValid(t, c, img, nil, what)
	for _, p := range m.pending {
		if _, err := u.WriteAt(m.disk[p[0]:p[0]+p[1]], p[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := u.Sync(); err != nil {
		t.Fatal(err)
	}
	qemuValid(t, c, img, m.disk, what+", the batch written again")
	u.Close()
	return used
}
