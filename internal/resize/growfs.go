package resize

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

// Filesystems GrowFS grows.
const (
	Ext = "ext"
	XFS = "xfs"
)

// DetectFS returns Ext or XFS for the filesystem that starts at byte
// start of the file or device at path, "" for another or none.
func DetectFS(path string, start int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b := make([]byte, 2048)
	if err := readFull(f, b, start); err != nil {
		return "", fmt.Errorf("read the superblock at byte %d of %s: %w", start, path, err)
	}
	switch {
	case binary.LittleEndian.Uint16(b[1024+56:]) == 0xEF53:
		return Ext, nil
	case bytes.Equal(b[:4], []byte("XFSB")):
		return XFS, nil
	}
	return "", nil
}

// GrowFS grows the ext2/3/4 or XFS filesystem of partition g of the disk
// at path (a file or a device) to fill the partition, through a loop
// device over the partition's bytes: that needs no partition devices, so
// neither udev nor a re-read of the partition table. It needs root and
// e2fsprogs (e2fsck, resize2fs) or xfsprogs (xfs_growfs).
func GrowFS(ctx context.Context, path string, g Grown) (fs string, err error) {
	fs, err = DetectFS(path, g.Start)
	if err != nil {
		return "", err
	}
	if fs == "" {
		return "", fmt.Errorf("partition %d holds no ext2/3/4 or XFS filesystem: only those are grown", g.Number)
	}
	loop, err := command(ctx, "losetup", "--find", "--show", "--offset", strconv.FormatInt(g.Start, 10),
		"--sizelimit", strconv.FormatInt(g.NewSize, 10), path)
	if err != nil {
		return fs, fmt.Errorf("attach partition %d of %s to a loop device: %w", g.Number, path, err)
	}
	loop = strings.TrimSpace(loop)
	defer func() {
		if _, derr := command(context.WithoutCancel(ctx), "losetup", "--detach", loop); derr != nil && err == nil {
			err = fmt.Errorf("detach %s: %w", loop, derr)
		}
	}()
	if fs == Ext {
		return fs, growExt(ctx, loop)
	}
	return fs, growXFS(ctx, loop)
}

func growExt(ctx context.Context, dev string) error {
	// resize2fs insists on a filesystem checked since it was last
	// mounted, which a restored one never is; -p repairs only what is
	// safe without asking, and exit status 1 means it did.
	if _, err := command(ctx, "e2fsck", "-f", "-p", dev); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			return fmt.Errorf("check the filesystem before growing it: %w", err)
		}
	}
	if _, err := command(ctx, "resize2fs", dev); err != nil {
		return fmt.Errorf("grow the filesystem: %w", err)
	}
	return nil
}

func growXFS(ctx context.Context, dev string) (err error) {
	dir, err := os.MkdirTemp("", "sauve-growfs-")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	// nouuid: the filesystem restored may be the very one mounted on
	// this machine, which XFS would otherwise refuse as a duplicate.
	if _, err := command(ctx, "mount", "-t", "xfs", "-o", "nouuid", dev, dir); err != nil {
		return fmt.Errorf("mount the filesystem to grow it: %w", err)
	}
	defer func() {
		if _, uerr := command(context.WithoutCancel(ctx), "umount", dir); uerr != nil && err == nil {
			err = fmt.Errorf("unmount %s: %w", dir, uerr)
		}
	}()
	if _, err := command(ctx, "xfs_growfs", dir); err != nil {
		return fmt.Errorf("grow the filesystem: %w", err)
	}
	return nil
}

// command runs a tool and returns its output; a failure carries what it
// printed.
func command(ctx context.Context, name string, args ...string) (string, error) {
	var out, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(stderr.String()+out.String()))
	}
	return out.String(), nil
}
