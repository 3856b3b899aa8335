package shadow

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
)

const mib = 1 << 20

func twoDrives() []testDrive {
	return []testDrive{{id: "drive0", format: "qcow2", size: 16 * mib}, {id: "drive1", format: "raw", size: 16 * mib}}
}

// The views hold what the drives held at the instant, whatever the VM
// writes after it; Close leaves nothing behind.
func TestQEMUViews(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	vm.mustWrite("drive0", 1, 0, 2*mib)
	vm.mustWrite("drive1", 2, 4*mib, mib)
	q, warns := vm.open(QEMUOptions{})
	if uuid, name := q.VM(); uuid != testUUID || name != "vm1" {
		t.Errorf("VM() = %q, %q", uuid, name)
	}
	want := []QEMUDrive{{"drive0", "node-drive0", "qcow2", 16 * mib}, {"drive1", "node-drive1", "raw", 16 * mib}}
	if got := q.Drives(); !reflect.DeepEqual(got, want) {
		t.Errorf("Drives() = %+v, want %+v", got, want)
	}
	vs := views(t, q)
	// Written after the instant: not in the views.
	vm.mustWrite("drive0", 9, mib, 2*mib)
	vm.mustWrite("drive1", 9, 0, 16*mib)
	for i, tc := range []struct {
		data []extent.Range
		fill func(off int64) byte
	}{
		{[]extent.Range{{Start: 0, End: 2 * mib}}, func(off int64) byte {
			if off < 2*mib {
				return 1
			}
			return 0
		}},
		{nil, func(off int64) byte {
			if off >= 4*mib && off < 5*mib {
				return 2
			}
			return 0
		}},
	} {
		v := vs[i]
		if wantPath := "qemu:" + vm.sock + "#" + want[i].ID; v.Of.Path != wantPath || v.Of.Kind != "qemu" || v.Size != 16*mib || v.Copy != "qemu" {
			t.Errorf("view %d: path %s kind %s size %d copy %s", i, v.Of.Path, v.Of.Kind, v.Size, v.Copy)
		}
		buf := make([]byte, v.Size)
		if _, err := v.At.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		for off := int64(0); off < v.Size; off += 64 << 10 {
			if buf[off] != tc.fill(off) || buf[off+65535] != tc.fill(off) {
				t.Fatalf("view of %s at %d holds %d, want %d", want[i].ID, off, buf[off], tc.fill(off))
			}
		}
		if i == 0 {
			if got := ranges(t, v.Data, v.Size); !reflect.DeepEqual(got, tc.data) {
				t.Errorf("data map of drive0: %v, want %v", got, tc.data)
			}
		}
		if err := v.Verify(); err != nil {
			t.Errorf("Verify of %s: %v", want[i].ID, err)
		}
		if v.Tracker != "" || v.Changes != nil || v.FullRead != "" {
			t.Errorf("without Bitmaps: tracker %q, changes %v, full read %q", v.Tracker, v.Changes, v.FullRead)
		}
	}
	// Both drives had 1 MiB of data overwritten after the instant, and
	// holes, which the fleecing images record as such: they hold 1 MiB of
	// data each, and their tables.
	for i, v := range vs {
		if used := v.CopyUsed(); used < mib || used > 3*mib {
			t.Errorf("CopyUsed of drive%d = %d, want 1 MiB and some", i, used)
		}
	}
	if err := vs[0].Release(); err != nil {
		t.Fatal(err)
	}
	if err := vs[0].Verify(); err != nil {
		t.Errorf("Verify after Release: %v", err)
	}
	if r := q.Report(); r.NoFreeze != "guest freeze off" || r.FleeceUsed < 2*mib {
		t.Errorf("report %+v", r)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	vm.assertClean(q.opts.FleeceDir, nil)
	if len(*warns) > 0 {
		t.Errorf("warnings: %q", *warns)
	}
}

// Fleecing images are files without a name: nothing is on disk, even
// while they are in use.
func TestQEMUNamelessImages(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	q, _ := vm.open(QEMUOptions{})
	views(t, q)
	if ents, _ := os.ReadDir(q.opts.FleeceDir); len(ents) > 0 {
		t.Errorf("in the fleecing folder: %v", ents)
	}
	if ents, _ := os.ReadDir(os.Getenv("TMPDIR")); len(ents) > 0 {
		t.Errorf("in TMPDIR: %v", ents)
	}
}

func errorContains(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("error %v, want one saying %q", err, want)
	}
}

// The drives are read at one instant: a writer that writes numbered
// blocks to two drives in lockstep, while the copies are taken and read,
// finds in them one cut of its sequence.
func TestQEMUConsistentCut(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	const blocks, steps, block = 8, 240, 64 << 10
	var step atomic.Int64
	viewsDone := make(chan struct{})
	writerErr := make(chan error, 1)
	go func() {
		for s := int64(1); s <= steps; s++ {
			if s == 200 {
				<-viewsDone // the instant falls before the sequence ends
			}
			off := (s % blocks) * mib
			for _, d := range []string{"drive0", "drive1"} {
				if err := vm.write(d, byte(s), off, block); err != nil {
					writerErr <- err
					return
				}
			}
			step.Store(s)
		}
		writerErr <- nil
	}()
	for step.Load() < 40 {
		time.Sleep(time.Millisecond)
	}
	q, _ := vm.open(QEMUOptions{})
	vs := views(t, q)
	close(viewsDone)
	cuts := make([]int, 2)
	for i, v := range vs {
		seen := make([]int, blocks)
		buf := make([]byte, block)
		for b := 0; b < blocks; b++ {
			if _, err := v.At.ReadAt(buf, int64(b)*mib); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, bytes.Repeat(buf[:1], block)) {
				t.Fatalf("drive%d block %d is torn", i, b)
			}
			seen[b] = int(buf[0])
			cuts[i] = max(cuts[i], seen[b])
		}
		// Block b holds the last step s <= cut with s%blocks == b.
		for b, got := range seen {
			want := cuts[i] - ((cuts[i]-b)%blocks+blocks)%blocks
			if want < 1 {
				want = 0
			}
			if got != want {
				t.Errorf("drive%d at cut %d: block %d holds step %d, want %d", i, cuts[i], b, got, want)
			}
		}
		if err := v.Verify(); err != nil {
			t.Error(err)
		}
	}
	if err := <-writerErr; err != nil {
		t.Fatal(err)
	}
	// drive0 is written first in each step.
	if cuts[0] < 40 || cuts[0] >= 200 || (cuts[1] != cuts[0] && cuts[1] != cuts[0]-1) {
		t.Errorf("cut at step %d of drive0 and %d of drive1: not one instant between steps 40 and 200", cuts[0], cuts[1])
	}
}

// Bitmaps: each backup's view records a new generation; the next one's
// Changes are exactly the blocks written since (at 64 KiB); a backup that
// failed (no Commit) loses nothing; a bitmap that is gone means a full
// read, and says why.
func TestQEMUBitmaps(t *testing.T) {
	vm := newVM(t, "none", nil, twoDrives()...)
	since := map[string]string{}
	backup := func(commit bool) []string {
		t.Helper()
		q, _ := vm.open(QEMUOptions{Bitmaps: true, Since: func(d string) string { return since[d] }})
		vs := views(t, q)
		fullRead := []string{vs[0].FullRead, vs[1].FullRead}
		if vs[1].Tracker != "" || vs[1].Changes != nil {
			t.Errorf("raw drive1: tracker %q, changes %v", vs[1].Tracker, vs[1].Changes)
		}
		if !strings.HasPrefix(vs[0].Tracker, TrackerPrefix+"sauve-") {
			t.Fatalf("drive0's tracker %q", vs[0].Tracker)
		}
		if q.Report().FullRead["drive1"] != "drive drive1 is raw: persistent dirty bitmaps need qcow2" {
			t.Errorf("report %v", q.Report().FullRead)
		}
		if c := vs[0].Changes; c != nil {
			if c.Since != since["drive0"] {
				t.Errorf("Changes.Since %q, want %q", c.Since, since["drive0"])
			}
			fullRead = append(fullRead, fmt.Sprint(ranges(t, c.Map, vs[0].Size)))
		}
		for _, v := range vs {
			if err := v.Verify(); err != nil {
				t.Fatal(err)
			}
		}
		if commit {
			if err := q.Commit(context.Background()); err != nil {
				t.Fatal(err)
			}
			since["drive0"] = vs[0].Tracker
		}
		if err := q.Close(); err != nil {
			t.Fatal(err)
		}
		return append(fullRead, bitmapOf(vs[0].Tracker))
	}
	r := backup(true)
	if r[0] != "no earlier backup of drive0 through this VM" || r[1] != "drive drive1 is raw: persistent dirty bitmaps need qcow2" {
		t.Errorf("first backup's full reads: %q", r)
	}
	gen1 := r[2]
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {gen1}})

	vm.mustWrite("drive0", 3, 100<<10, 10<<10) // one block: 64 KiB..128 KiB
	vm.mustWrite("drive0", 3, 5*mib, 200<<10)  // 5 MiB..5 MiB+256 KiB
	vm.mustWrite("drive1", 3, 0, mib)
	r = backup(false) // fails: not committed
	if want := "[{65536 131072} {5242880 5505024}]"; r[0] != "" || r[2] != want {
		t.Errorf("second backup: full read %q, changes %s, want %s", r[0], r[2], want)
	}
	gen2 := r[3]
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {gen1, gen2}})

	vm.mustWrite("drive0", 4, 12*mib, 64<<10)
	r = backup(true)
	if want := "[{65536 131072} {5242880 5505024} {12582912 12648448}]"; r[0] != "" || r[2] != want {
		t.Errorf("third backup (after a failed one): full read %q, changes %s, want %s", r[0], r[2], want)
	}
	gen3 := r[3]
	vm.assertClean(filepath.Join(vm.dir, "fleece"), map[string][]string{"drive0": {gen3}})

	r = backup(false) // nothing written since
	if r[0] != "" || r[2] != "[]" {
		t.Errorf("backup with no writes: full read %q, changes %s", r[0], r[2])
	}
	since["drive0"] = TrackerPrefix + gen1 // retired by the third backup
	r = backup(false)
	if want := "bitmap " + gen1 + " is missing from drive0 (QEMU stopped before saving it, it was removed, or the image was replaced)"; r[0] != want {
		t.Errorf("full read %q, want %q", r[0], want)
	}
	// A bitmap of another tool is left alone.
	vm.exec("block-dirty-bitmap-add", map[string]any{"node": "node-drive0", "name": "sauve-backup-of-other-tool", "persistent": true}, nil)
	since["drive0"] = TrackerPrefix + gen3
	backup(true)
	var nodes []qNode
	vm.exec("query-named-block-nodes", map[string]any{"flat": true}, &nodes)
	found := false
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			found = found || b.Name == "sauve-backup-of-other-tool"
		}
	}
	if !found {
		t.Error("Commit removed another tool's bitmap")
	}
}
