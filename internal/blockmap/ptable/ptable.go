// Package ptable reads partition tables: MBR (primary, extended and
// logical partitions) and GPT (protective MBR, primary and backup headers
// and entry arrays, with their CRCs). It trusts nothing it reads: every
// entry is checked against the disk's size and the other entries, and
// what does not fit is reported in Problem rather than believed, so a
// caller can image such ranges in full.
//
// Written by hand: the formats are small and fixed, and the Go libraries
// that read them either write tables too (more surface than a backup
// needs) or do not report overlaps and damage the way a backup must.
package ptable

import (
	"errors"
	"io"
	"strconv"
)

// Kinds of partition table.
const (
	MBR = "mbr"
	GPT = "gpt"
)

// Table is a disk's partition table.
type Table struct {
	Kind       string // MBR or GPT
	SectorSize int    // logical sector size the table's LBAs count in
	// ID is the MBR disk signature (8 hex digits) or the GPT disk GUID.
	ID         string
	Partitions []Partition
	// Warnings are problems that do not make the table unusable (a damaged
	// backup GPT, an entry that was ignored).
	Warnings []string
}

// Partition is one entry of a table.
type Partition struct {
	Number   int
	Start    int64 // bytes from the start of the disk
	Size     int64 // bytes
	Type     string
	TypeName string
	Name     string // GPT partition name
	UUID     string // GPT unique partition GUID
	Bootable bool   // MBR active flag
	// Container marks an MBR extended partition: it holds the logical
	// partitions and their EBRs, not a filesystem.
	Container bool
	// Problem, when not empty, says why the entry cannot be trusted
	// (overlap, past the end of the disk): its range must be imaged in
	// full and not parsed as a filesystem.
	Problem string
}

// End returns the byte just past the partition.
func (p *Partition) End() int64 { return p.Start + p.Size }

// Read finds the partition table of a disk of size bytes. sectorSize is
// the logical sector size when known (a device), 0 otherwise: 512 is
// assumed for MBR and both 512 and 4096 are tried for GPT. It returns
// nil and no error when the disk has no partition table it recognises.
// Errors are I/O errors only; damage is reported in the result.
func Read(r io.ReaderAt, size int64, sectorSize int) (*Table, error) {
	if size < 512 {
		return nil, nil
	}
	mbr := make([]byte, 512)
	if err := readFull(r, mbr, 0); err != nil {
		return nil, err
	}
	if mbr[510] != 0x55 || mbr[511] != 0xAA {
		return nil, nil
	}
	if hasProtective(mbr) {
		sizes := []int{512, 4096}
		if sectorSize > 0 {
			sizes = []int{sectorSize}
		}
		var firstErr *Table
		for _, ss := range sizes {
			t, err := readGPT(r, size, ss)
			if err != nil {
				return nil, err
			}
			if t != nil && len(t.Warnings) == 0 {
				return t, nil
			}
			if t != nil && firstErr == nil {
				firstErr = t
			}
		}
		if firstErr != nil {
			return firstErr, nil
		}
		// A protective MBR without a readable GPT: the layout is unknown.
		return &Table{Kind: GPT, SectorSize: max(sectorSize, 512), Warnings: []string{
			"protective MBR found but neither the primary nor the backup GPT header is valid"}}, nil
	}
	if sectorSize <= 0 {
		sectorSize = 512
	}
	return readMBR(r, size, sectorSize, mbr)
}

// Damaged reports whether the table could not be read at all (a GPT
// whose headers are both invalid): the whole disk must then be imaged.
func (t *Table) Damaged() bool { return t.Kind == GPT && t.ID == "" }

// checkLayout marks entries that run past the disk or overlap others,
// and clips every entry to the disk, those already marked with a
// problem too. Logical partitions are allowed inside their extended
// container.
func checkLayout(parts []Partition, size int64) {
	for i := range parts {
		p := &parts[i]
		problem := ""
		switch {
		case p.Start >= size:
			problem = "starts past the end of the disk"
			p.Size = 0
			p.Start = size
		case p.Size > size-p.Start:
			problem = "runs past the end of the disk"
			p.Size = size - p.Start
		}
		if p.Problem == "" {
			p.Problem = problem
		}
	}
	for i := range parts {
		for j := i + 1; j < len(parts); j++ {
			a, b := &parts[i], &parts[j]
			if a.Size == 0 || b.Size == 0 || a.Container != b.Container && contains(a, b) {
				continue
			}
			if a.Start < b.End() && b.Start < a.End() {
				if a.Problem == "" {
					a.Problem = "overlaps partition " + strconv.Itoa(b.Number)
				}
				if b.Problem == "" {
					b.Problem = "overlaps partition " + strconv.Itoa(a.Number)
				}
			}
		}
	}
}

// contains reports whether one of a, b is an extended container that
// holds the other entirely.
func contains(a, b *Partition) bool {
	if b.Container {
		a, b = b, a
	}
	return a.Container && b.Start >= a.Start && b.End() <= a.End()
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
