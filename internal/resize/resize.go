// Package resize fixes a disk's partition table after the disk was copied
// onto a larger target: a GPT's backup header and entry array move to the
// new end (as `sgdisk -e` does), the primary header and the protective
// MBR learn the new size, and on request the partition that ends last
// grows to the end of the disk. Partitions never move or shrink.
//
// Plan only reads and computes the byte patches, so that a table it does
// not understand, or damage, is refused before anything is written;
// Apply writes them. Written by hand: the edits are a few fixed fields and
// CRCs, and the Go partitioning libraries rewrite whole tables from their
// own model of them, which could lose what they do not model.
package resize

import (
	"errors"
	"fmt"
	"io"

	"github.com/sauve-backup/sauve/internal/blockmap/ptable"
)

// Options say what Plan may change beyond the GPT's end-of-disk
// structures.
type Options struct {
	// GrowLastPartition grows the partition that ends last on the disk
	// to the end of the disk.
	GrowLastPartition bool
	// SectorSize is the disk's logical sector size when known (a
	// device); 0 tries 512 and 4096 for GPT and takes 512 for MBR.
	SectorSize int
}

// Patch is bytes to write at an offset of the disk.
type Patch struct {
	Off  int64
	Data []byte
}

// Grown describes the partition Plan grows.
type Grown struct {
	Number           int
	Start            int64 // bytes
	OldSize, NewSize int64 // bytes
}

// Result is what Plan found and what to write.
type Result struct {
	Kind       string // ptable.GPT, ptable.MBR, or "" for a disk without a partition table
	SectorSize int
	// Patches are in the order they must be written: the backup GPT
	// first, so that a crash part-way leaves the primary intact.
	Patches []Patch
	Grown   *Grown // nil when no partition grows
}

// ErrRefused wraps every reason Plan refuses a disk.
var ErrRefused = errors.New("refusing to change the partition table")

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, args...))
}

// Plan computes the patches that make the partition table of a disk of
// oldSize bytes, read through r, right for newSize bytes. A disk without
// a partition table needs none (and cannot grow a partition).
func Plan(r io.ReaderAt, oldSize, newSize int64, o Options) (*Result, error) {
	if newSize < oldSize {
		return nil, refuse("the new size (%d bytes) is smaller than the disk (%d bytes)", newSize, oldSize)
	}
	if o.SectorSize != 0 && o.SectorSize != 512 && o.SectorSize != 4096 {
		return nil, refuse("sector size %d (only 512 and 4096 are handled)", o.SectorSize)
	}
	if oldSize < 512 {
		return noTable(o)
	}
	mbr := make([]byte, 512)
	if err := readFull(r, mbr, 0); err != nil {
		return nil, fmt.Errorf("read the MBR: %w", err)
	}
	if mbr[510] != 0x55 || mbr[511] != 0xAA {
		return noTable(o)
	}
	if protective(mbr) >= 0 {
		return planGPT(r, mbr, oldSize, newSize, o)
	}
	t, err := ptable.Read(r, oldSize, o.SectorSize)
	if err != nil {
		return nil, fmt.Errorf("read the partition table: %w", err)
	}
	if t == nil || t.Kind != ptable.MBR {
		// A filesystem's boot sector also ends in 0x55AA.
		return noTable(o)
	}
	return planMBR(r, mbr, t, oldSize, newSize, o)
}

func noTable(o Options) (*Result, error) {
	if o.GrowLastPartition {
		return nil, refuse("the disk has no partition table sauve understands: there is no partition to grow")
	}
	return &Result{}, nil
}

// checkProblems refuses a table whose entries ptable does not trust:
// growing an overlapping partition would make things worse.
func checkProblems(t *ptable.Table) error {
	for _, p := range t.Partitions {
		if p.Problem != "" {
			return refuse("partition %d %s", p.Number, p.Problem)
		}
	}
	return nil
}

// Apply plans and writes the patches onto the disk rw of newSize bytes,
// whose first oldSize bytes hold the disk as it was copied. Nothing is
// written when Plan refuses.
func Apply(rw interface {
	io.ReaderAt
	io.WriterAt
}, oldSize, newSize int64, o Options) (*Result, error) {
	res, err := Plan(rw, oldSize, newSize, o)
	if err != nil {
		return nil, err
	}
	for _, p := range res.Patches {
		if _, err := rw.WriteAt(p.Data, p.Off); err != nil {
			return nil, fmt.Errorf("write the partition table at byte %d: %w", p.Off, err)
		}
	}
	return res, nil
}

func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
