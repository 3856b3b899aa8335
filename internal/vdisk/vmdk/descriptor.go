package vmdk

import (
	"bytes"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// A descriptor file (VMware "Virtual Disk Format", section "The
// Descriptor File") is text naming the extents that make up a disk, in
// order: FLAT and VMFS extents (raw data at an offset of a file: ESXi's
// -flat.vmdk, monolithicFlat, twoGbMaxExtentFlat), SPARSE extents (hosted
// sparse extents: twoGbMaxExtentSparse) and ZERO extents.

// maxDescriptor bounds the descriptor text read (VMware's are a few KiB).
const maxDescriptor = 1 << 20

// maxExtents bounds the extents of one disk (a 2 TiB twoGbMaxExtent disk
// has 1024).
const maxExtents = 65536

// Opener opens an extent file named in a descriptor, relative to it.
type Opener func(name string) (r io.ReaderAt, size int64, closer io.Closer, err error)

type vmdkExtent struct {
	start, size int64 // virtual bytes
	kind        string
	r           io.ReaderAt // FLAT: the file; SPARSE: the extent reader
	off         int64       // FLAT: byte offset in the file
	sparse      *Reader
}

// Disk is a disk described by a descriptor file. It is safe for
// concurrent use.
type Disk struct {
	name    string
	size    int64
	extents []vmdkExtent
	closers []io.Closer
	// CreateType is the descriptor's createType.
	CreateType string
}

// OpenDescriptor parses the descriptor file in r (size bytes, called name
// in errors) and opens its extents with open.
func OpenDescriptor(r io.ReaderAt, size int64, name string, open Opener) (_ *Disk, err error) {
	if size > maxDescriptor {
		return nil, vdio.Errorf(name, format, 0, "descriptor file of %d bytes is too large (at most %d)", size, maxDescriptor)
	}
	b := make([]byte, size)
	if err := vdio.ReadFull(r, size, b, 0, name, format, "descriptor"); err != nil {
		return nil, err
	}
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i] // the text may be padded with zeros to a sector
	}
	d := &Disk{name: name}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	pos := int64(0)
	for _, line := range strings.Split(string(b), "\n") {
		at := pos
		pos += int64(len(line)) + 1
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		// "key=value" and "ddb.key = value" lines; extent lines hold
		// spaces and quotes before any "=".
		k, v, ok := strings.Cut(line, "=")
		if ok && (!strings.ContainsAny(k, "\" ") || strings.HasPrefix(k, "ddb.")) {
			k, v = strings.TrimSpace(k), strings.Trim(strings.TrimSpace(v), `"`)
			switch k {
			case "createType":
				d.CreateType = v
			case "parentCID":
				if !strings.EqualFold(v, "ffffffff") {
					return nil, vdio.Unsupported(name, format, at, "delta disk with a parent (parentCID=%s): convert the whole chain with 'qemu-img convert' first", v)
				}
			}
			continue
		}
		if err := d.addExtent(line, at, open); err != nil {
			return nil, err
		}
	}
	if len(d.extents) == 0 {
		return nil, vdio.Errorf(name, format, 0, "descriptor file names no extent")
	}
	return d, nil
}

// addExtent parses an extent line: access, size in sectors, type, and for
// all but ZERO a quoted file name and, for FLAT, an offset in sectors.
func (d *Disk) addExtent(line string, at int64, open Opener) error {
	fields, q, _ := strings.Cut(line, `"`)
	f := strings.Fields(fields)
	if len(f) < 3 {
		return vdio.Errorf(d.name, format, at, "cannot read descriptor line %q", trim(line))
	}
	switch f[0] {
	case "RW", "RDONLY":
	case "NOACCESS":
		return vdio.Unsupported(d.name, format, at, "extent with access NOACCESS")
	default:
		return vdio.Errorf(d.name, format, at, "unknown extent access %q", trim(f[0]))
	}
	sectors, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || sectors <= 0 || sectors > vdio.MaxVirtualSize/sector {
		return vdio.Errorf(d.name, format, at, "extent size %q is not a sector count", trim(f[1]))
	}
	if len(d.extents) >= maxExtents {
		return vdio.Errorf(d.name, format, at, "more than %d extents", maxExtents)
	}
	e := vmdkExtent{start: d.size, size: sectors * sector, kind: f[2]}
	if d.size+e.size > vdio.MaxVirtualSize {
		return vdio.Errorf(d.name, format, at, "extents add up to more than %d bytes", int64(vdio.MaxVirtualSize))
	}
	var file, rest string
	if f[2] != "ZERO" {
		var ok bool
		file, rest, ok = strings.Cut(q, `"`)
		if !ok || file == "" {
			return vdio.Errorf(d.name, format, at, "extent line without a quoted file name: %q", trim(line))
		}
		// Extent files live beside the descriptor; a path that leaves
		// its directory is refused rather than followed.
		if path.IsAbs(file) || strings.Contains(file, `\`) || path.Clean(file) != file || strings.HasPrefix(file, "../") || file == ".." {
			return vdio.Unsupported(d.name, format, at, "extent file %q is not a plain name beside the descriptor", trim(file))
		}
	}
	switch f[2] {
	case "ZERO":
	case "FLAT", "VMFS":
		r, size, c, err := open(file)
		if err != nil {
			return vdio.Wrap(d.name, format, at, err, "open extent %q", file)
		}
		d.closers = append(d.closers, c)
		if s := strings.Fields(rest); len(s) > 0 {
			o, err := strconv.ParseInt(s[0], 10, 64)
			if err != nil || o < 0 || o > vdio.MaxVirtualSize/sector {
				return vdio.Errorf(d.name, format, at, "extent offset %q is not a sector number", trim(s[0]))
			}
			e.off = o * sector
		}
		if e.off+e.size > size {
			return vdio.Errorf(d.name, format, at, "extent %q holds %d bytes, the descriptor needs %d from offset %d", file, size, e.size, e.off)
		}
		e.r = r
	case "SPARSE":
		r, size, c, err := open(file)
		if err != nil {
			return vdio.Wrap(d.name, format, at, err, "open extent %q", file)
		}
		d.closers = append(d.closers, c)
		s, err := Open(r, size, file)
		if err != nil {
			return err
		}
		if s.Size() < e.size {
			return vdio.Errorf(d.name, format, at, "sparse extent %q holds %d bytes, the descriptor needs %d", file, s.Size(), e.size)
		}
		e.r, e.sparse = s, s
	default:
		return vdio.Unsupported(d.name, format, at, "extent type %q (ESX delta and SE sparse extents are not supported: convert with 'qemu-img convert' first)", trim(f[2]))
	}
	d.extents = append(d.extents, e)
	d.size += e.size
	return nil
}

func trim(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Size returns the virtual size.
func (d *Disk) Size() int64 { return d.size }

// Close closes the extent files.
func (d *Disk) Close() error {
	var first error
	for _, c := range d.closers {
		if c == nil {
			continue
		}
		if err := c.Close(); err != nil && first == nil {
			first = err
		}
	}
	d.closers = nil
	return first
}

// find returns the index of the extent holding off.
func (d *Disk) find(off int64) int {
	lo, hi := 0, len(d.extents)
	for lo < hi {
		m := (lo + hi) / 2
		if d.extents[m].start+d.extents[m].size <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// ReadAt reads the virtual disk.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: negative offset", d.name)
	}
	if off >= d.size {
		return 0, io.EOF
	}
	want := len(p)
	if rest := d.size - off; int64(len(p)) > rest {
		p = p[:rest]
	}
	done := 0
	for i := d.find(off); len(p) > 0; i++ {
		e := d.extents[i]
		n := min(int64(len(p)), e.start+e.size-off)
		switch {
		case e.r == nil:
			clear(p[:n])
		case e.sparse != nil:
			if _, err := e.sparse.ReadAt(p[:n], off-e.start); err != nil && err != io.EOF {
				return done, err
			}
		default:
			if k, err := e.r.ReadAt(p[:n], e.off+off-e.start); int64(k) < n {
				if err == nil || err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return done, vdio.Wrap(d.name, format, e.off+off-e.start, err, "read flat extent at virtual offset %d", off)
			}
		}
		p, off, done = p[n:], off+n, done+int(n)
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// Data implements extent.Map: flat extents are all data (callers may
// not know their files' holes), sparse extents map their grains, zero
// extents nothing.
func (d *Disk) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := min(off+n, d.size)
	for i := d.find(off); off < end; i++ {
		e := d.extents[i]
		k := min(end, e.start+e.size) - off
		switch {
		case e.r == nil:
		case e.sparse != nil:
			rs, err := e.sparse.Data(off-e.start, k)
			if err != nil {
				return nil, err
			}
			for _, r := range rs {
				out = vdio.AddRange(out, r.Start+e.start, r.End+e.start)
			}
		default:
			out = vdio.AddRange(out, off, off+k)
		}
		off += k
	}
	return out, nil
}
