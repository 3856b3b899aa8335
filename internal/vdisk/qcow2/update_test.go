package qcow2

import (
	"bytes"
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
				if fi.Size() < 9<<20 {
					t.Fatalf("file of %d bytes did not outgrow the first refcount table", fi.Size())
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
			qemuImg(t, "create", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o", "encrypt.format=luks,encrypt.key-secret=s0", p, "1M")
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

// TestUpdateCrash stops the disk at every write of one Sync: the image
// reopens, qemu-img check finds at worst leaked clusters, each cluster
// reads as before or after the interrupted Sync, and later writes land
// right.
func TestUpdateCrash(t *testing.T) {
	vdiotest.NeedQemuImg(t)
	const size, cluster = 2<<20 + 4096, 65536
	dir := t.TempDir()
	// The ops of the interrupted Sync touch distinct clusters, so each
	// reads as a whole as before or after.
	rng := rand.New(rand.NewPCG(7, 7))
	first := vdiotest.RandomOps(rng, size, cluster, 12, false)
	second := vdiotest.RandomOps(rng, size, cluster, 10, true)
	// Count the writes of the second round.
	count := func(budget int) (*vdiotest.Dropping, string) {
		p := filepath.Join(dir, "crash.qcow2")
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
	leaked := 0 // crash points that leave leaked clusters
	for budget := 0; budget <= total; budget++ {
		_, p := count(budget)
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
	t.Logf("%d of %d crash points leave leaked clusters", leaked, total+1)
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
