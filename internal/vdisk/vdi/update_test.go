package vdi

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func inPlace(fixed bool, block int64) vdiotest.InPlace {
	return vdiotest.InPlace{Format: "vdi", Check: true, Size: 9<<20 + 1536, Block: block,
		Create: func(f *os.File, size int64) (vdiotest.InPlaceUpdater, error) {
			return createUpdate(f, f.Name(), size, fixed, block)
		},
		Open: func(f *os.File) (vdiotest.InPlaceUpdater, error) { return OpenUpdate(f, f.Name()) },
	}
}

func TestUpdate(t *testing.T) {
	for _, c := range []struct {
		name  string
		fixed bool
		block int64
	}{{"dynamic", false, mib}, {"fixed", true, mib}} {
		t.Run(c.name, func(t *testing.T) { vdiotest.TestInPlace(t, inPlace(c.fixed, c.block)) })
	}
}

func TestUpdateCrash(t *testing.T) {
	vdiotest.TestCrash(t, inPlace(false, mib), func(f *vdiotest.DroppingFile) (vdiotest.InPlaceUpdater, error) {
		return OpenUpdate(f, f.Name())
	})
}

func TestUpdateRefusals(t *testing.T) {
	dir := t.TempDir()
	good := func() []byte {
		var f vdiotest.MemFile
		w, err := newWriter(&f, 8<<20, false, mib)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 4096)
		p[0] = 1
		w.WriteAt(p, 0)
		w.WriteAt(p, 2<<20)
		w.Close()
		return f.B
	}
	for _, c := range []struct {
		name, want string
		mod        func(b []byte)
		unsup      bool
	}{
		{"differencing", "differencing", func(b []byte) { vdio.LE.PutUint32(b[76:], typeDiff) }, true},
		{"block used twice", "used twice", func(b []byte) { vdio.LE.PutUint32(b[mib+8:], 0) }, false},
		{"count mismatch", "counts 3 allocated", func(b []byte) { vdio.LE.PutUint32(b[388:], 3) }, false},
		{"bad signature", "signature", func(b []byte) { b[64]++ }, false},
	} {
		b := good()
		c.mod(b)
		p := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "-")+".vdi")
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

func FuzzOpenUpdate(f *testing.F) {
	vdiotest.FuzzInPlace(f, func(rw vdio.RWFile) (vdiotest.InPlaceUpdater, int64, error) {
		u, err := OpenUpdate(rw, "fuzz.vdi")
		if err != nil {
			return nil, 0, err
		}
		return u, u.Size(), nil
	})
}
