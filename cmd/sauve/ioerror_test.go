package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// faultyFile is a FUSE file backed by a real file whose reads and writes
// fail with EIO over [badOff, badOff+badLen) while armed: a disk with a
// bad sector range, or a target that fails to write one. Device-mapper's
// dm-error/dm-flakey would be the usual way, but this kernel has no
// device-mapper; FUSE gives the same errno to the same system calls.
type faultyFile struct {
	fs.Inode
	backing        *os.File
	badOff, badLen int64
	armed          atomic.Bool
	failed         atomic.Int64 // requests answered with EIO
}

var (
	_ fs.NodeGetattrer = (*faultyFile)(nil)
	_ fs.NodeSetattrer = (*faultyFile)(nil)
	_ fs.NodeOpener    = (*faultyFile)(nil)
	_ fs.NodeReader    = (*faultyFile)(nil)
	_ fs.NodeWriter    = (*faultyFile)(nil)
	_ fs.NodeFsyncer   = (*faultyFile)(nil)
)

func (f *faultyFile) bad(off int64, n int) bool {
	return f.armed.Load() && off < f.badOff+f.badLen && off+int64(n) > f.badOff
}

func (f *faultyFile) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	fi, err := f.backing.Stat()
	if err != nil {
		return fs.ToErrno(err)
	}
	out.Mode = syscall.S_IFREG | 0o644
	out.Size = uint64(fi.Size())
	out.Blocks = (uint64(fi.Size()) + 511) / 512
	return 0
}

func (f *faultyFile) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok {
		if err := f.backing.Truncate(int64(sz)); err != nil {
			return fs.ToErrno(err)
		}
	}
	return f.Getattr(ctx, fh, out)
}

func (f *faultyFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	// Direct I/O: every read reaches us, none is served from the page
	// cache filled while the file was healthy.
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (f *faultyFile) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if f.bad(off, len(dest)) {
		f.failed.Add(1)
		return nil, syscall.EIO
	}
	n, err := f.backing.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fs.ToErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (f *faultyFile) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if f.bad(off, len(data)) {
		f.failed.Add(1)
		return 0, syscall.EIO
	}
	n, err := f.backing.WriteAt(data, off)
	if err != nil {
		return uint32(n), fs.ToErrno(err)
	}
	return uint32(n), 0
}

func (f *faultyFile) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	return 0
}

// mountFaulty serves backing as dir/name through FUSE until the test ends.
func mountFaulty(t *testing.T, dir, name, backing string, badOff, badLen int64) *faultyFile {
	t.Helper()
	requireRoot(t)
	bf, err := os.OpenFile(backing, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bf.Close() })
	file := &faultyFile{backing: bf, badOff: badOff, badLen: badLen}
	root := &fs.Inode{}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	srv, err := fs.Mount(dir, root, &fs.Options{
		MountOptions: fuse.MountOptions{AllowOther: true, FsName: "sauve-faulty", DisableXAttrs: true},
		OnAdd: func(ctx context.Context) {
			root.AddChild(name, root.NewPersistentInode(ctx, file, fs.StableAttr{Mode: syscall.S_IFREG}), false)
		},
	})
	if err != nil {
		t.Skipf("FUSE is not available here (%v): the I/O error tests need /dev/fuse", err)
	}
	t.Cleanup(func() { _ = srv.Unmount() })
	return file
}

// TestReadErrorFailsCleanly: a source that fails with EIO in the middle
// (a bad sector) stops the backup with one error naming the source, the
// offset and the errno; nothing already stored is lost; the repository
// checks clean; once the disk reads again the next backup completes and
// reuses what the failed one stored.
func TestReadErrorFailsCleanly(t *testing.T) {
	e := newEnv(t, "--pack-size", "1M")
	backing := e.path("backing.img")
	firstSrc := e.path("first-src.img")
	writeFile(t, firstSrc, randomBytes(24<<20))
	sh(t, "cp", firstSrc, backing)
	first := e.backup(firstSrc)

	const badOff = 17<<20 + 4096
	f := mountFaulty(t, e.path("fuse"), "disk.img", backing, badOff, 4096)
	src := filepath.Join(e.path("fuse"), "disk.img")
	// A different disk than the first backup, so that the failed run has
	// new data to store before it reaches the bad range.
	writeAt(t, backing, 0, randomBytes(16<<20))
	f.armed.Store(true)
	stderr := e.fail([]string{src, "offset", "input/output error"}, "backup", src)
	t.Logf("backup of a failing disk: %s", strings.TrimSpace(stderr))
	if f.failed.Load() == 0 {
		t.Fatal("the bad range was never read")
	}
	if lines := strings.Count(strings.TrimSpace(stderr), "\n") + 1; lines > 2 {
		t.Errorf("a read error should give a short error, got %d lines:\n%s", lines, stderr)
	}
	var sn []json.RawMessage
	e.okJSON(&sn, "snapshots")
	if len(sn) != 1 {
		t.Fatalf("%d snapshots after a failed backup, want the first one only", len(sn))
	}
	e.ok("check", "--read-data")
	out := e.path("first.img")
	e.ok("restore", first.Snapshot, out)
	sameFile(t, firstSrc, out)

	// The disk reads again: the backup completes, and the 16 MiB the
	// failed run stored are not stored twice.
	f.armed.Store(false)
	second := e.backup(src)
	if second.BytesNew > 4<<20 {
		t.Errorf("backup after the read error stored %d new bytes: the failed run's packs were not reused", second.BytesNew)
	}
	out2 := e.path("second.img")
	e.ok("restore", "latest", out2, "--source", src)
	sameFile(t, backing, out2)
	e.ok("check", "--read-data")
}

// TestWriteErrorFailsCleanly: a restore target that fails a write with EIO
// stops the restore with an error naming the target and the errno, and
// exits non-zero.
func TestWriteErrorFailsCleanly(t *testing.T) {
	e := newEnv(t)
	img := e.path("disk.img")
	writeFile(t, img, randomBytes(8<<20))
	e.backup(img)

	backing := e.path("target-backing.img")
	writeFile(t, backing, make([]byte, 8<<20))
	f := mountFaulty(t, e.path("fuse"), "target.img", backing, 5<<20, 4096)
	f.armed.Store(true)
	target := filepath.Join(e.path("fuse"), "target.img")
	stderr := e.fail([]string{target, "input/output error"}, "restore", "latest", target)
	t.Logf("restore to a failing target: %s", strings.TrimSpace(stderr))
	if f.failed.Load() == 0 {
		t.Fatal("the bad range was never written")
	}
	// Healthy again: the restore completes and the target equals the image.
	f.armed.Store(false)
	e.ok("restore", "latest", target)
	sameFile(t, img, backing)
}
