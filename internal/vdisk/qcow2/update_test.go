package qcow2

import (
	"bytes"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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
		{"qemu", 3 << 20, 65536, []string{"-o", "compat=1.1"}},
		// 512-byte clusters: the refcount table (one cluster, 8 MiB of
		// file) has to grow and move.
		{"qemu-small-clusters", 12 << 20, 512, []string{"-o", "cluster_size=512"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "t.qcow2")
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
				qemuImg(t, append(append([]string{"create", "-f", "qcow2"}, c.qemu...), path, strconv.FormatInt(c.size, 10))...)
				u, err = OpenUpdate(openFile(t, path), path)
			}
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, c.size)
			rng := rand.New(rand.NewPCG(uint64(c.size), 1))
			nops := 150
			if c.cluster == 512 {
				nops = 1500
			}
			for round := range 4 {
				for range 2 {
					vdiotest.Apply(t, u, model, vdiotest.RandomOps(rng, c.size, c.cluster, nops, false))
					if err := u.Sync(); err != nil {
						t.Fatal(err)
					}
					vdiotest.QemuCompare(t, path, "qcow2", model)
				}
				if c.cluster == 512 && round == 1 {
					// Fill most of the disk so the file outgrows the
					// refcount table.
					full := make([]byte, c.size-4096)
					for i := range full {
						full[i] = byte(i*7 + 1)
					}
					vdiotest.Apply(t, u, model, []vdiotest.Op{{Off: 2048, Len: int64(len(full)), Data: full}})
				}
				if err := u.Close(); err != nil {
					t.Fatal(err)
				}
				vdiotest.QemuCompare(t, path, "qcow2", model)
				if u, err = OpenUpdate(openFile(t, path), path); err != nil {
					t.Fatalf("reopen: %v", err)
				}
			}
			if c.cluster == 512 {
				fi, _ := os.Stat(path)
				if fi.Size() < 9<<20 || rtOff(t, path) < 8<<20 {
					t.Fatalf("file of %d bytes, refcount table at %d: the table did not grow and move", fi.Size(), rtOff(t, path))
				}
			}
		})
	}
}

// rtOff returns the refcount table offset of the image at path.
func rtOff(t *testing.T, path string) int64 {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 56 {
		t.Fatalf("read %s: %v", path, err)
	}
	return int64(binary.BigEndian.Uint64(b[48:]))
}

// TestUpdateRefuses: images that cannot be updated safely are refused
// with why.
func TestUpdateRefuses(t *testing.T) {
	vdiotest.NeedQemuImg(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-f", "qcow2", base, "1M")
	raw := filepath.Join(dir, "data.raw")
	if err := os.WriteFile(raw, []byte(strings.Repeat("compress me ", 1<<16)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		make func(path string)
		want string
	}{
		{"v2", func(p string) { qemuImg(t, "create", "-f", "qcow2", "-o", "compat=0.10", p, "1M") }, "version 2"},
		{"zstd", func(p string) { qemuImg(t, "create", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M") }, "zstd"},
		{"backing", func(p string) { qemuImg(t, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", p) }, "backing file"},
		{"refcount-bits", func(p string) { qemuImg(t, "create", "-f", "qcow2", "-o", "refcount_bits=8", p, "1M") }, "refcounts of 8 bits"},
		{"extended-l2", func(p string) { qemuImg(t, "create", "-f", "qcow2", "-o", "extended_l2=on", p, "1M") }, "extended L2"},
		{"data-file", func(p string) {
			qemuImg(t, "create", "-f", "qcow2", "-o", "data_file="+p+".data", p, "1M")
		}, "external data file"},
		{"encrypted", func(p string) {
			// The header's crypt_method set by hand: qemu-img's LUKS
			// set-up benchmarks the CPU and fails on a loaded machine
			// ("Unable to get accurate CPU usage").
			qemuImg(t, "create", "-f", "qcow2", p, "1M")
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte{0, 0, 0, 2}, 32); err != nil { // crypt_method: LUKS
				t.Fatal(err)
			}
		}, "encrypt"},
		{"snapshot", func(p string) {
			qemuImg(t, "create", "-f", "qcow2", p, "1M")
			qemuImg(t, "snapshot", "-c", "s1", p)
		}, "internal snapshots"},
		{"compressed", func(p string) { qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", raw, p) }, "compressed clusters"},
		{"dirty", func(p string) {
			qemuImg(t, "create", "-f", "qcow2", p, "1M")
			f := openFile(t, p)
			if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0, 1}, 72); err != nil {
				t.Fatal(err)
			}
		}, "dirty"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			c.make(p)
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

// TestUpdateCrash stops the disk at writes of one Sync (every one, or,
// for the Sync that moves the refcount table, a spread and those around
// the header's): the image reopens, qemu-img check finds at worst
// leaked clusters, each cluster reads as before or after the
// interrupted Sync, and later writes land right, leaking no more.
func TestUpdateCrash(t *testing.T) {
	vdiotest.NeedQemuImg(t)
	rng := rand.New(rand.NewPCG(7, 7))
	// The ops of the interrupted Sync touch distinct clusters, so each
	// reads as a whole as before or after.
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i*5 + 3)
	}
	for _, c := range []struct {
		name          string
		size, cluster int64
		qemu          []string // qemu-img create options, or CreateUpdate
		first, second []vdiotest.Op
		moves         bool
	}{
		{name: "ours", size: 2<<20 + 4096, cluster: 65536,
			first:  vdiotest.RandomOps(rng, 2<<20+4096, 65536, 12, false),
			second: vdiotest.RandomOps(rng, 2<<20+4096, 65536, 10, true)},
		// The first round fills the file up to what the refcount table
		// covers (8 MiB of 512-byte clusters); the second outgrows it.
		{name: "table-moves", size: 10 << 20, cluster: 512, qemu: []string{"-o", "cluster_size=512"},
			first:  []vdiotest.Op{{Off: 0, Len: 7 << 20, Data: bytes.Repeat([]byte{9, 8, 7, 6}, 7<<18)}},
			second: []vdiotest.Op{{Off: 8 << 20, Len: 1 << 20, Data: big}, {Off: 100, Len: 3000, Zero: true}},
			moves:  true},
	} {
		t.Run(c.name, func(t *testing.T) { crash(t, rng, c.size, c.cluster, c.qemu, c.first, c.second, c.moves) })
	}
}

func crash(t *testing.T, rng *rand.Rand, size, cluster int64, qemu []string, first, second []vdiotest.Op, moves bool) {
	dir := t.TempDir()
	run := func(budget int) (*vdiotest.Dropping, string) {
		p := filepath.Join(dir, "crash.qcow2")
		os.Remove(p)
		var u *Updater
		var f *os.File
		var err error
		if qemu == nil {
			if f, err = os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			u, err = CreateUpdate(f, size, p)
		} else {
			qemuImg(t, append(append([]string{"create", "-q", "-f", "qcow2"}, qemu...), p, strconv.FormatInt(size, 10))...)
			f = openFile(t, p)
			u, err = OpenUpdate(f, p)
		}
		if err != nil {
			t.Fatal(err)
		}
		vdiotest.Apply(t, u, nil, first)
		if err := u.Sync(); err != nil {
			t.Fatal(err)
		}
		d := &vdiotest.Dropping{File: f, Budget: budget}
		u.f = d
		vdiotest.Apply(t, u, nil, second)
		if err := u.Sync(); err != nil {
			t.Fatal(err)
		}
		return d, p
	}
	const lots = 1 << 30
	d, _ := run(lots)
	total := lots - d.Budget
	if total < 5 {
		t.Fatalf("only %d writes in a Sync", total)
	}
	budgets := map[int]bool{total: true}
	if !moves {
		for b := range total {
			budgets[b] = true
		}
	} else {
		header := -1
		for i, off := range d.Offsets {
			if off == 48 {
				header = i
			}
		}
		if header < 0 {
			t.Fatal("the Sync did not move the refcount table")
		}
		for b := max(0, header-3); b <= min(total, header+3); b++ {
			budgets[b] = true
		}
		for b := 0; b < total; b += total/12 + 1 {
			budgets[b] = true
		}
	}
	old := make([]byte, size)
	vdiotest.Apply(t, nopUpdater{}, old, first)
	nw := append([]byte(nil), old...)
	vdiotest.Apply(t, nopUpdater{}, nw, second)
	leaked := 0 // crash points that leave leaked clusters
	for budget := range budgets {
		_, p := run(budget)
		code, out := vdiotest.QemuCheck(t, p, "qcow2")
		if code != 0 && code != 3 {
			t.Fatalf("crash after %d of %d writes: qemu-img check exit %d:\n%s", budget, total, code, out)
		}
		if code == 3 {
			leaked++
		}
		got := vdiotest.QemuRaw(t, p, "qcow2")
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
		code2, out2 := vdiotest.QemuCheck(t, p, "qcow2")
		if code2 != 0 && code2 != 3 || (code == 0 && code2 != 0) {
			t.Fatalf("after the crash (check exit %d), the next writes left check exit %d:\n%s", code, code2, out2)
		}
		if l1, l2 := leaks(out), leaks(out2); l2 > l1 || (code2 == 3) != (l2 > 0) {
			t.Fatalf("%d leaked clusters after the crash, %d after the next writes (exit %d):\n%s", l1, l2, code2, out2)
		}
		if raw := vdiotest.QemuRaw(t, p, "qcow2"); string(raw) != string(got) {
			t.Fatalf("after a crash after %d writes, the next writes read back wrong", budget)
		}
	}
	if leaked == 0 {
		t.Error("no crash point left leaked clusters: the test does not reach the window it is for")
	}
	t.Logf("%d of %d crash points leave leaked clusters", leaked, len(budgets))
}

// leaks returns the number of leaked clusters qemu-img check reports.
func leaks(out string) int {
	m := regexp.MustCompile(`(\d+) leaked clusters? w`).FindStringSubmatch(out)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

type nopUpdater struct{}

func (nopUpdater) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }
func (nopUpdater) Zero(int64, int64) error                { return nil }
func (nopUpdater) Sync() error                            { return nil }
func (nopUpdater) Close() error                           { return nil }

func fuzzOpenUpdate(m *vdiotest.MemUpdate) (vdiotest.SizedUpdater, error) {
	return OpenUpdate(m, "fuzz.qcow2")
}

func FuzzUpdate(f *testing.F) {
	vdiotest.FuzzUpdate(f, fuzzOpenUpdate, func(b []byte) (io.ReaderAt, error) {
		return Open(bytes.NewReader(b), int64(len(b)), "fuzz.qcow2")
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
		qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, qemu)
		s := map[string][]byte{}
		for name, p := range map[string]string{"ours": ours, "qemu": qemu} {
			if s[name], err = os.ReadFile(p); err != nil {
				t.Fatal(err)
			}
		}
		return s
	})
}
