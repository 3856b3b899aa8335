package ova

import (
	"archive/tar"
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// Reading an OVA: the tar members are listed (headers only: each member's
// data is found at its offset in the file and read in place, never
// extracted), the OVF descriptor, which DSP0243 puts first, is parsed for
// its disks (DiskSection's Disk elements, each naming through its fileRef
// a File of the References section, whose href is a member of the tar),
// and the caller opens a disk's member as the image it is (usually a
// streamOptimized VMDK). Compressed (ovf:compression) and chunked
// (ovf:chunkSize) disk files and sparse tar members are refused; so are
// references to files outside the archive.

const format = "ova"

// Limits on what an archive may ask a reader to do.
const (
	maxMembers    = 10000
	maxDescriptor = 4 << 20
)

// Member is a regular file of the archive: its data lies at Offset in
// the OVA, Size bytes.
type Member struct {
	Name   string
	Offset int64
	Size   int64
	sparse bool
}

// Disk is a virtual disk that the descriptor lists.
type Disk struct {
	// ID is its ovf:diskId.
	ID string
	// File is the member holding it, nil for a blank disk (no fileRef:
	// the hypervisor creates it empty).
	File *Member
	// Format is its ovf:format URI.
	Format string
}

// Label names the disk for people: its ID and file.
func (d Disk) Label() string {
	if d.File == nil {
		return d.ID + " (blank, no file)"
	}
	return d.ID + " (" + d.File.Name + ")"
}

// Package is an OVA's table of contents.
type Package struct {
	// Descriptor is the OVF descriptor's member.
	Descriptor Member
	// Disks are the descriptor's disks, in its order.
	Disks   []Disk
	members map[string]*Member
}

// Lookup returns the member called name (relative to the archive's root).
func (p *Package) Lookup(name string) (*Member, bool) {
	m, ok := p.members[cleanName(name)]
	return m, ok
}

// IsTar reports whether b, a file's first 512 bytes, is a tar header:
// the POSIX ustar (or GNU) magic at offset 257 and a valid checksum.
func IsTar(b []byte) bool {
	if len(b) < 512 || (string(b[257:263]) != "ustar\x00" && string(b[257:265]) != "ustar  \x00") {
		return false
	}
	want, ok := octal(b[148:156])
	if !ok {
		return false
	}
	var u, s int64
	for i, c := range b[:512] {
		if i >= 148 && i < 156 {
			c = ' '
		}
		u += int64(c)
		s += int64(int8(c))
	}
	return want == u || want == s
}

func octal(b []byte) (int64, bool) {
	s := strings.Trim(string(b), " \x00")
	if s == "" {
		return 0, false
	}
	n, err := strconv.ParseInt(s, 8, 64)
	return n, err == nil
}

// Sniff returns the name of the first file of the tar archive in r, and
// whether it is an OVF descriptor (the archive is then an OVA).
func Sniff(r io.ReaderAt, size int64) (first string, ok bool) {
	tr := tar.NewReader(io.NewSectionReader(r, 0, size))
	for range 8 {
		h, err := tr.Next()
		if err != nil {
			return "", false
		}
		if h.Typeflag == tar.TypeDir {
			continue
		}
		n := cleanName(h.Name)
		return n, h.Typeflag == tar.TypeReg && strings.EqualFold(path.Ext(n), ".ovf")
	}
	return "", false
}

func cleanName(n string) string {
	n = path.Clean(strings.TrimLeft(n, "/"))
	return strings.TrimPrefix(n, "./")
}

// Read lists the members of the OVA in r (size bytes, called name in
// errors) and the disks its descriptor names.
func Read(r io.ReaderAt, size int64, name string) (*Package, error) {
	sr := io.NewSectionReader(r, 0, size)
	tr := tar.NewReader(sr)
	p := &Package{members: map[string]*Member{}}
	var first *Member
	for i := 0; ; i++ {
		at, _ := sr.Seek(0, io.SeekCurrent)
		if i == maxMembers {
			return nil, vdio.Errorf(name, format, at, "more than %d members in the archive", maxMembers)
		}
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, vdio.Errorf(name, format, at, "tar archive ends inside a member or header (truncated?)")
			}
			return nil, vdio.Errorf(name, format, at, "damaged tar header: %v", err)
		}
		off, _ := sr.Seek(0, io.SeekCurrent)
		if h.Typeflag != tar.TypeReg && h.Typeflag != tar.TypeGNUSparse {
			continue // directories, links, ...: not what a descriptor names
		}
		m := &Member{Name: cleanName(h.Name), Offset: off, Size: h.Size, sparse: h.Typeflag == tar.TypeGNUSparse}
		for k := range h.PAXRecords {
			m.sparse = m.sparse || strings.HasPrefix(k, "GNU.sparse.")
		}
		if h.Size < 0 || h.Size > size-off {
			return nil, vdio.Errorf(name, format, at, "member %q of %d bytes at offset %d runs past the end of the file (%d bytes): truncated?", trim(m.Name), h.Size, off, size)
		}
		if first == nil {
			first = m
		}
		if _, dup := p.members[m.Name]; !dup {
			p.members[m.Name] = m
		}
	}
	if first == nil {
		return nil, vdio.Errorf(name, format, 0, "the tar archive holds no file")
	}
	if !strings.EqualFold(path.Ext(first.Name), ".ovf") {
		return nil, vdio.Errorf(name, format, first.Offset, "first member %q is not an OVF descriptor (.ovf): not an OVA", trim(first.Name))
	}
	p.Descriptor = *first
	if first.Size > maxDescriptor {
		return nil, vdio.Errorf(name, format, first.Offset, "OVF descriptor %q of %d bytes is too large (at most %d)", trim(first.Name), first.Size, maxDescriptor)
	}
	b := make([]byte, first.Size)
	if err := vdio.ReadFull(r, size, b, first.Offset, name, format, "OVF descriptor "+first.Name); err != nil {
		return nil, err
	}
	if err := p.parse(b, name); err != nil {
		return nil, err
	}
	return p, nil
}

// The parts of an OVF envelope (DSP0243, 1.x and 2.x; the XML names are
// matched in any namespace) that locate its disks.
type envelope struct {
	Files []ovfFile `xml:"References>File"`
	Disks []ovfDisk `xml:"DiskSection>Disk"`
}

type ovfFile struct {
	ID          string `xml:"id,attr"`
	Href        string `xml:"href,attr"`
	Compression string `xml:"compression,attr"`
	ChunkSize   string `xml:"chunkSize,attr"`
}

type ovfDisk struct {
	ID      string `xml:"diskId,attr"`
	FileRef string `xml:"fileRef,attr"`
	Format  string `xml:"format,attr"`
}

func (p *Package) parse(b []byte, name string) error {
	desc := p.Descriptor
	bad := func(msg string, a ...any) error {
		return vdio.Errorf(name, format, desc.Offset, "OVF descriptor %s: %s", trim(desc.Name), fmt.Sprintf(msg, a...))
	}
	var env envelope
	d := xml.NewDecoder(bytes.NewReader(b))
	if err := d.Decode(&env); err != nil {
		return bad("%v", err)
	}
	files := map[string]ovfFile{}
	for _, f := range env.Files {
		files[f.ID] = f
	}
	for _, x := range env.Disks {
		disk := Disk{ID: trim(x.ID), Format: x.Format}
		if disk.ID == "" {
			disk.ID = fmt.Sprintf("disk %d", len(p.Disks)+1)
		}
		if x.FileRef != "" {
			f, ok := files[x.FileRef]
			if !ok {
				return bad("disk %s names file %q, which References does not list", disk.ID, trim(x.FileRef))
			}
			if strings.Contains(f.Href, "://") {
				return bad("disk %s is the file %q, outside the archive", disk.ID, trim(f.Href))
			}
			m, ok := p.Lookup(f.Href)
			if !ok || f.Href == "" {
				return bad("disk %s is the file %q, which the archive does not hold", disk.ID, trim(f.Href))
			}
			if f.Compression != "" && f.Compression != "identity" {
				return vdio.Unsupported(name, format, m.Offset, "disk %s, member %s, is %s-compressed (ovf:compression): extract and decompress it first ('tar -xf %s')", disk.ID, trim(m.Name), trim(f.Compression), path.Base(name))
			}
			if f.ChunkSize != "" {
				return vdio.Unsupported(name, format, m.Offset, "disk %s is split into chunks of %s bytes (ovf:chunkSize): extract them ('tar -xf %s') and join them first", disk.ID, trim(f.ChunkSize), path.Base(name))
			}
			if m.sparse {
				return vdio.Unsupported(name, format, m.Offset, "disk %s, member %s, is a sparse tar member: extract it first ('tar -xf %s')", disk.ID, trim(m.Name), path.Base(name))
			}
			disk.File = m
		}
		p.Disks = append(p.Disks, disk)
	}
	if len(p.Disks) == 0 {
		return bad("its DiskSection lists no disk")
	}
	return nil
}

func trim(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}
