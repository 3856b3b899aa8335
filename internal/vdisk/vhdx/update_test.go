package vhdx

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func inPlace(size int64) vdiotest.InPlace {
	return vdiotest.InPlace{Format: "vhdx", Check: true, Size: size, Block: BlockSize(size),
		Create: func(f *os.File, size int64) (vdiotest.InPlaceUpdater, error) { return CreateUpdate(f, f.Name(), size) },
		Open:   func(f *os.File) (vdiotest.InPlaceUpdater, error) { return OpenUpdate(f, f.Name()) },
	}
}

func TestUpdate(t *testing.T) { vdiotest.TestInPlace(t, inPlace(25<<20+1536)) }

func TestUpdateCrash(t *testing.T) {
	vdiotest.TestCrash(t, inPlace(25<<20+1536), func(f *vdiotest.DroppingFile) (vdiotest.InPlaceUpdater, error) {
		return OpenUpdate(f, f.Name())
	})
}

// Images qemu-img made, dynamic and fixed, with its block sizes and
// layout, are updated too.
func TestUpdateQemuMade(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed")
	}
	for _, opts := range []string{"subformat=dynamic", "subformat=fixed", "subformat=fixed,block_state_zero=off", "block_size=1M"} {
		c := inPlace(12 << 20)
		c.Block = 1 << 20
		c.Create = func(f *os.File, size int64) (vdiotest.InPlaceUpdater, error) {
			if out, err := exec.Command("qemu-img", "create", "-f", "vhdx", "-o", opts, f.Name(), "12M").CombinedOutput(); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			return OpenUpdate(f, f.Name())
		}
		t.Run(opts, func(t *testing.T) { vdiotest.TestInPlace(t, c) })
	}
}

func TestUpdateRefusals(t *testing.T) {
	dir := t.TempDir()
	good := func() []byte {
		var f vdiotest.MemFile
		w, err := NewWriter(&f, 16<<20)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 4096)
		p[0] = 1
		w.WriteAt(p, 0)
		w.Close()
		return f.B
	}
	for _, c := range []struct {
		name, want string
		mod        func(b []byte)
		unsup      bool
	}{
		{"log to replay", "log holds changes", func(b []byte) {
			for _, off := range []int{64 * kib, 128 * kib} {
				h := b[off : off+4*kib]
				copy(h[48:], "0123456789abcdef")
				vdio.LE.PutUint32(h[4:], crc(h, 4))
			}
			copy(b[mib:], "loge")
			copy(b[mib+32:], "0123456789abcdef")
		}, true},
		{"block over the BAT", "over the BAT", func(b []byte) { vdio.LE.PutUint64(b[3*mib:], stateFull|3<<20) }, false},
		{"bad headers", "neither header", func(b []byte) { b[64*kib] ^= 1; b[128*kib] ^= 1 }, false},
	} {
		b := good()
		c.mod(b)
		p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-")+".vhdx")
		os.WriteFile(p, b, 0o600)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		_, err = OpenUpdate(f, p)
		f.Close()
		if err == nil || !strings.Contains(err.Error(), c.want) || errors.Is(err, vdio.ErrUnsupported) != c.unsup {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
}

// A block in state ZERO that keeps its space in the file reads as zeros
// and is made present there by a write, the rest of it cleared.
func TestUpdateReservedZeroBlock(t *testing.T) {
	var mf vdiotest.MemFile
	w, err := NewWriter(&mf, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, 8<<20)
	for i := range junk {
		junk[i] = 0xaa
	}
	w.WriteAt(junk, 0)
	w.Close()
	e := vdio.LE.Uint64(mf.B[3*mib:])
	vdio.LE.PutUint64(mf.B[3*mib:], e&^7|stateZero)
	p := filepath.Join(t.TempDir(), "z.vhdx")
	os.WriteFile(p, mf.B, 0o600)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u, err := OpenUpdate(f, p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := u.WriteAt([]byte("new"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := u.Sync(); err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	r, err := Open(f, fi.Size(), p)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16<<20)
	copy(want[4096:], "new")
	vdiotest.Check(t, r, want)
	if fi.Size() != int64(len(mf.B)) || r.bat[0] != e>>20*mib {
		t.Errorf("file of %d bytes (was %d), block at %d (was %d)", fi.Size(), len(mf.B), r.bat[0], e>>20*mib)
	}
}

func FuzzOpenUpdate(f *testing.F) {
	vdiotest.FuzzInPlace(f, func(rw vdio.RWFile) (vdiotest.InPlaceUpdater, int64, error) {
		u, err := OpenUpdate(rw, "fuzz.vhdx")
		if err != nil {
			return nil, 0, err
		}
		return u, u.Size(), nil
	})
}
