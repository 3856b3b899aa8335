package cli

import (
	"encoding/binary"
	"fmt"
	"io"
	"strings"

	"github.com/sauve-backup/sauve/internal/fsread/ext"
	"github.com/sauve-backup/sauve/internal/fsread/fat"
	"github.com/sauve-backup/sauve/internal/fsread/ntfs"
	"github.com/sauve-backup/sauve/internal/fsread/xfs"
	"github.com/sauve-backup/sauve/internal/repo"
)

// fsOpenOptions are what every filesystem reader may be asked for.
type fsOpenOptions struct {
	// NoReplay reads the filesystem as stored, without replaying its
	// journal or log in memory.
	NoReplay bool
	// Warn reports what a reader could not do but worked around.
	Warn func(string)
}

// fsReader is one filesystem file-level restore can read: probe
// recognises its superblock, open reads it.
type fsReader struct {
	name  string
	probe func(r io.ReaderAt) bool
	open  func(r *io.SectionReader, o fsOpenOptions) (fileSystem, error)
}

// fsReaders lists the readers in the order they are probed. A reader of
// another filesystem adds one entry here.
func fsReaders() []fsReader {
	return []fsReader{
		{name: "ext2/3/4", probe: probeExt, open: func(r *io.SectionReader, o fsOpenOptions) (fileSystem, error) {
			return ext.Open(r, r.Size(), ext.Options{NoReplay: o.NoReplay, Warn: o.Warn})
		}},
		{name: "XFS", probe: probeXFS, open: func(r *io.SectionReader, o fsOpenOptions) (fileSystem, error) {
			return xfs.Open(r, r.Size(), xfs.Options{NoReplay: o.NoReplay, Warn: o.Warn})
		}},
		{name: "NTFS", probe: probeNTFS, open: func(r *io.SectionReader, o fsOpenOptions) (fileSystem, error) {
			return ntfs.Open(r, r.Size(), ntfs.Options{Warn: o.Warn})
		}},
		{name: "FAT12/16/32", probe: fat.Probe, open: func(r *io.SectionReader, o fsOpenOptions) (fileSystem, error) {
			return fat.Open(r, r.Size(), fat.Options{Warn: o.Warn})
		}},
	}
}

func probeExt(r io.ReaderAt) bool {
	var magic [2]byte
	_, err := r.ReadAt(magic[:], 1024+56)
	return err == nil && binary.LittleEndian.Uint16(magic[:]) == 0xEF53
}

func probeXFS(r io.ReaderAt) bool {
	var magic [4]byte
	_, err := r.ReadAt(magic[:], 0)
	return err == nil && string(magic[:]) == "XFSB"
}

func probeNTFS(r io.ReaderAt) bool {
	var oem [8]byte
	_, err := r.ReadAt(oem[:], 3)
	return err == nil && string(oem[:]) == "NTFS    "
}

// openFS detects the filesystem of a partition by its magic.
func openFS(r *io.SectionReader, p repo.Partition, noReplay bool, warn func(string)) (fileSystem, error) {
	readers := fsReaders()
	for _, fr := range readers {
		if fr.probe(r) {
			return fr.open(r, fsOpenOptions{NoReplay: noReplay, Warn: warn})
		}
	}
	names := make([]string, len(readers))
	for i, fr := range readers {
		names[i] = fr.name
	}
	known := strings.Join(names, ", ")
	if p.Filesystem == "" {
		return nil, fmt.Errorf("no filesystem this version reads files from (%s) was found", known)
	}
	return nil, fmt.Errorf("filesystem %s not supported yet for file access (%s only)", p.Filesystem, known)
}
