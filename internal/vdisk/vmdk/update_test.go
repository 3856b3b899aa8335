package vmdk

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

func openFile(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestUpdateRandom writes and zeroes at random, checking the image with
// qemu-img after every Sync and reopening it between rounds.
func TestUpdateRandom(t *testing.T) {
	vdiotest.NeedQemuImg(t)
	for _, c := range []struct {
		name    string
		size    int64
		cluster int64
		qemu    []string // qemu-img create options, or ours
	}{
		{"ours", 5<<20 + 512, 65536, nil},
		{"qemu", 3 << 20, 65536, []string{"-o", "subformat=monolithicSparse"}},
		{"qemu-zeroed-grain", 3 << 20, 65536, []string{"-o", "zeroed_grain=on"}},
		// No grain tables: each is allocated at the end.
		{"no-tables", 70 << 20, 65536, []string{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "t.vmdk")
			var u *Updater
			var err error
			if c.qemu == nil {
				f, err2 := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
				if err2 != nil {
					t.Fatal(err2)
				}
				defer f.Close()
				u, err = CreateUpdate(f, c.size, path)
			} else {
				qemuImg(t, append(append([]string{"create", "-f", "vmdk"}, c.qemu...), path, strconv.FormatInt(c.size, 10))...)
				if len(c.qemu) == 0 {
					dropTables(t, path)
				}
				u, err = OpenUpdate(openFile(t, path), path)
			}
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, c.size)
			rng := rand.New(rand.NewPCG(uint64(c.size), 1))
			nops := 150
			for range 4 {
				for range 2 {
					vdiotest.Apply(t, u, model, vdiotest.RandomOps(rng, c.size, c.cluster, nops, false))
					if err := u.Sync(); err != nil {
						t.Fatal(err)
					}
					vdiotest.QemuCompare(t, path, "vmdk", model)
				}
				if err := u.Close(); err != nil {
					t.Fatal(err)
				}
				vdiotest.QemuCompare(t, path, "vmdk", model)
				if u, err = OpenUpdate(openFile(t, path), path); err != nil {
					t.Fatalf("reopen: %v", err)
				}
			}
		})
	}
}

// TestUpdateRefuses: images that cannot be updated safely are refused
// with why.
func TestUpdateRefuses(t *testing.T) {
	vdiotest.NeedQemuImg(t)
	dir := t.TempDir()
	for _, c := range []struct {
		name, subformat, want string
	}{
		{"stream", "streamOptimized", "streamOptimized"},
		{"split", "twoGbMaxExtentSparse", "descriptor"},
		{"flat", "monolithicFlat", "descriptor"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".vmdk")
			qemuImg(t, "create", "-f", "vmdk", "-o", "subformat="+c.subformat, p, "1M")
			before, _ := os.ReadFile(p)
			_, err := OpenUpdate(openFile(t, p), p)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("OpenUpdate = %v, want an error saying %q", err, c.want)
			}
			if after, _ := os.ReadFile(p); string(after) != string(before) {
				t.Fatal("a refused image was changed")
			}
		})
	}
}

// dropTables clears the grain directories of the image at path, so
// that every grain table is allocated by the updater.
func dropTables(t *testing.T, path string) {
	t.Helper()
	f := openFile(t, path)
	fi, _ := f.Stat()
	r, err := Open(f, fi.Size(), path)
	if err != nil {
		t.Fatal(err)
	}
	z := make([]byte, 4*len(r.gd))
	for _, off := range []uint64{r.h.gdOff, r.h.rgdOff} {
		if _, err := f.WriteAt(z, int64(off)*sector); err != nil {
			t.Fatal(err)
		}
	}
}

// TestUpdateCrash stops the disk at every write of one Sync: the image
// reopens, qemu-img check finds it clean, each cluster
// reads as before or after the interrupted Sync, and later writes land
// right.
func TestUpdateCrash(t *testing.T) {
	vdiotest.NeedQemuImg(t)
	// With no grain table, the interrupted Sync allocates one and sets
	// its grain directory entries.
	for _, drop := range []bool{false, true} {
		t.Run(fmt.Sprintf("no-tables=%v", drop), func(t *testing.T) { crash(t, drop) })
	}
}

func crash(t *testing.T, drop bool) {
	const size, cluster = 2<<20 + 4096, 65536
	dir := t.TempDir()
	// The ops of the interrupted Sync touch distinct clusters, so each
	// reads as a whole as before or after.
	rng := rand.New(rand.NewPCG(7, 7))
	first := vdiotest.RandomOps(rng, size, cluster, 12, false)
	if drop {
		first = nil
	}
	second := vdiotest.RandomOps(rng, size, cluster, 10, true)
	// Count the writes of the second round.
	count := func(budget int) (*vdiotest.Dropping, string) {
		p := filepath.Join(dir, "crash.vmdk")
		os.Remove(p)
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		u, err := CreateUpdate(f, size, p)
		if err != nil {
			t.Fatal(err)
		}
		if drop {
			u.Close()
			dropTables(t, p)
			if u, err = OpenUpdate(f, p); err != nil {
				t.Fatal(err)
			}
		}
		vdiotest.Apply(t, u, make([]byte, size), first)
		if err := u.Sync(); err != nil {
			t.Fatal(err)
		}
		d := &vdiotest.Dropping{File: f, Budget: budget}
		u.f = d
		vdiotest.Apply(t, u, make([]byte, size), second)
		if err := u.Sync(); err != nil {
			t.Fatal(err)
		}
		return d, p
	}
	const lots = 1 << 30
	d, _ := count(lots)
	total := lots - d.Budget
	if total < 5 {
		t.Fatalf("only %d writes in a Sync", total)
	}
	old := make([]byte, size)
	vdiotest.Apply(t, nopUpdater{}, old, first)
	nw := append([]byte(nil), old...)
	vdiotest.Apply(t, nopUpdater{}, nw, second)
	for budget := 0; budget <= total; budget++ {
		_, p := count(budget)
		code, out := vdiotest.QemuCheck(t, p, "vmdk")
		if code != 0 {
			t.Fatalf("crash after %d of %d writes: qemu-img check exit %d:\n%s", budget, total, code, out)
		}
		got := vdiotest.QemuRaw(t, p, "vmdk")
		vdiotest.OldOrNew(t, got, old, nw, cluster)
		if budget == total && code != 0 {
			t.Fatalf("no crash, yet qemu-img check exit %d:\n%s", code, out)
		}
		u, err := OpenUpdate(openFile(t, p), p)
		if err != nil {
			t.Fatalf("reopen after a crash after %d writes: %v", budget, err)
		}
		third := vdiotest.RandomOps(rng, size, cluster, 20, false)
		vdiotest.Apply(t, u, got, third)
		if err := u.Close(); err != nil {
			t.Fatal(err)
		}
		u2, err := OpenUpdate(openFile(t, p), p)
		if err != nil {
			t.Fatal(err)
		}
		for i := range u2.gd {
			if (u2.gd[i] == 0) != (u2.rgd[i] == 0) {
				t.Fatalf("after a crash after %d writes and the next writes, grain directory entry %d is set in one copy only", budget, i)
			}
		}
		code2, out2 := vdiotest.QemuCheck(t, p, "vmdk")
		if code2 != 0 {
			t.Fatalf("after the crash (check exit %d), the next writes left check exit %d:\n%s", code, code2, out2)
		}
		if !strings.Contains(out2, "leaked") && code2 == 3 {
			t.Fatalf("exit 3 without leaks:\n%s", out2)
		}
		if raw := vdiotest.QemuRaw(t, p, "vmdk"); string(raw) != string(got) {
			t.Fatalf("after a crash after %d writes, the next writes read back wrong", budget)
		}
	}
}

type nopUpdater struct{}

func (nopUpdater) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
func (nopUpdater) Zero(int64, int64) error                { return nil }
func (nopUpdater) Sync() error                            { return nil }
func (nopUpdater) Close() error                           { return nil }

func fuzzOpenUpdate(m *vdiotest.MemUpdate) (vdiotest.SizedUpdater, error) {
	return OpenUpdate(m, "fuzz.vmdk")
}

func FuzzUpdate(f *testing.F) {
	vdiotest.FuzzUpdate(f, fuzzOpenUpdate, func(b []byte) (io.ReaderAt, error) {
		return Open(bytes.NewReader(b), int64(len(b)), "fuzz.vmdk")
	})
}

// TestUpdateCorpus checks that the seeds of FuzzUpdate open for update,
// and refreshes them first when SAUVE_WRITE_CORPUS is set: an image
// made by CreateUpdate and written, and one of qemu-img.
func TestUpdateCorpus(t *testing.T) {
	vdiotest.UpdateCorpus(t, fuzzOpenUpdate, func() map[string][]byte {
		dir := t.TempDir()
		ours := filepath.Join(dir, "ours")
		f, err := os.OpenFile(ours, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		u, err := CreateUpdate(f, 1<<20, ours)
		if err != nil {
			t.Fatal(err)
		}
		vdiotest.Apply(t, u, nil, vdiotest.RandomOps(rand.New(rand.NewPCG(1, 2)), 1<<20, 512, 4, false))
		if err := u.Close(); err != nil {
			t.Fatal(err)
		}
		raw := filepath.Join(dir, "src.raw")
		os.WriteFile(raw, vdiotest.SeedDisk(300000, 7), 0o644)
		qemu := filepath.Join(dir, "qemu")
		qemuImg(t, "convert", "-f", "raw", "-O", "vmdk", "-o", "zeroed_grain=on", raw, qemu)
		s := map[string][]byte{}
		for name, p := range map[string]string{"ours": ours, "qemu": qemu} {
			if s[name], err = os.ReadFile(p); err != nil {
				t.Fatal(err)
			}
		}
		return s
	})
}
