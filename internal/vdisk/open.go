package vdisk

import (
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk/ova"
	"github.com/sauve-backup/sauve/internal/vdisk/qcow2"
	"github.com/sauve-backup/sauve/internal/vdisk/vdi"
	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vhd"
	"github.com/sauve-backup/sauve/internal/vdisk/vhdx"
	"github.com/sauve-backup/sauve/internal/vdisk/vmdk"
)

// OpenOptions say how Open follows the files an image refers to.
type OpenOptions struct {
	// AllowOutside lets qcow2 backing files and VMDK extents lie outside
	// the folder of the image opened (and its subfolders).
	AllowOutside bool
}

// Open opens the image in r (size bytes, called name in errors) as a
// virtual disk, whatever its format, with the default OpenOptions. host,
// if not nil, maps the file's own data (its holes), and is used where
// virtual and file offsets coincide. name is also the path that the files
// an image refers to (a qcow2 backing file, VMDK extents) are found from;
// Close closes those.
//
// The files an image refers to must lie in the folder of name or below
// it, symlinks followed: an image is data, and data must not make sauve
// read /etc/shadow (a qcow2 image may name any absolute path as its
// backing file). OpenOptions.AllowOutside lifts this.
//
// An OVA is opened as the one disk it holds, read in place inside the
// archive. Formats that sauve recognises but does not read (see Detect)
// are refused with an error saying what the file is and what to do.
func Open(r io.ReaderAt, size int64, name string, host extent.Map) (*Image, error) {
	return OpenWith(r, size, name, host, OpenOptions{})
}

// OpenWith is Open with options.
func OpenWith(r io.ReaderAt, size int64, name string, host extent.Map, o OpenOptions) (*Image, error) {
	c := &chain{seen: map[[2]uint64]bool{}, root: folder(name), allowOutside: o.AllowOutside}
	if fi, err := os.Stat(name); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			c.seen[[2]uint64{uint64(st.Dev), st.Ino}] = true
		}
	}
	img, err := c.open(r, size, name, host, c.fileRefs(name))
	if err != nil {
		c.Close()
		return nil, err
	}
	img.closer = c
	return img, nil
}

// maxChain bounds a chain of backing files.
const maxChain = 32

// chain tracks the files opened for one image: backing files (loops and
// depth are refused) and VMDK extents.
type chain struct {
	seen         map[[2]uint64]bool
	depth        int
	closers      []io.Closer
	root         string // the folder referred files must lie in
	allowOutside bool
	inOVA        bool
}

func (c *chain) Close() error {
	var first error
	for _, x := range c.closers {
		if err := x.Close(); err != nil && first == nil {
			first = err
		}
	}
	c.closers = nil
	return first
}

// refs opens the files an image refers to: those beside it on disk, or
// the members of the OVA it is in.
type refs struct {
	backing qcow2.BackingOpener
	extents vmdk.Opener
}

func (c *chain) fileRefs(path string) refs {
	return refs{backing: c.backing(path), extents: c.extentOpener(path)}
}

// folder returns the folder of the image called name, absolute, its
// symlinks resolved: the files the image refers to must lie in it.
func folder(name string) string {
	d, err := filepath.Abs(filepath.Dir(name))
	if err != nil {
		return ""
	}
	if r, err := filepath.EvalSymlinks(d); err == nil {
		return r
	}
	return d
}

// resolve returns the file that an image names as file (absolute, or
// relative to dir), every symlink followed, and refuses it when it lies
// outside the chain's folder (unless allowed). what says what it is.
func (c *chain) resolve(file, dir, what string) (string, error) {
	p := file
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	p, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", err
	}
	if c.allowOutside || (c.root != "" && within(c.root, real)) {
		return real, nil
	}
	where := "it lies outside " + c.root
	if real != p {
		where = "it is " + real + ", outside " + c.root
	}
	return "", fmt.Errorf("%s, the folder of the image read: %s files must lie there or below (--allow-backing-outside reads it anyway): %w", where, what, vdio.ErrUnsupported)
}

// within reports whether p lies in the folder root or below.
func within(root, p string) bool {
	rel, err := filepath.Rel(root, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel)
}

// backing opens the backing file of the qcow2 overlay at path.
func (c *chain) backing(path string) qcow2.BackingOpener {
	return func(file, format string) (qcow2.Backing, error) {
		if strings.Contains(file, "://") || strings.HasPrefix(file, "json:") {
			return nil, fmt.Errorf("backing file %q is not a local file: %w", file, vdio.ErrUnsupported)
		}
		if c.depth++; c.depth > maxChain {
			return nil, fmt.Errorf("chain of more than %d backing files", maxChain)
		}
		real, err := c.resolve(file, filepath.Dir(path), "backing")
		if err != nil {
			return nil, err
		}
		// Named as the overlay names it: its own backing file is found
		// from there, as QEMU does.
		if !filepath.IsAbs(file) {
			file = filepath.Join(filepath.Dir(path), file)
		}
		f, err := os.Open(real)
		if err != nil {
			return nil, err
		}
		c.closers = append(c.closers, f)
		fi, err := f.Stat()
		if err != nil {
			return nil, err
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("backing file %s is not a regular file", file)
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			k := [2]uint64{uint64(st.Dev), st.Ino}
			if c.seen[k] {
				return nil, fmt.Errorf("backing file %s appears twice in the chain: it loops", file)
			}
			c.seen[k] = true
		}
		var host extent.Map
		if m := extent.NewSparse(f, fi.Size()); m != nil {
			host = m
		}
		var img *Image
		if format == "raw" {
			img = &Image{Format: Raw, Size: fi.Size(), ReaderAt: f, Map: host}
		} else {
			if img, err = c.open(f, fi.Size(), file, host, c.fileRefs(file)); err != nil {
				return nil, err
			}
			if format != "" && QemuName(img.Format) != format {
				return nil, fmt.Errorf("backing file %s is %s, the overlay says %s", file, img.Format, format)
			}
		}
		if img.Map == nil {
			img.Map = extent.Full{}
		}
		return backingImage{img}, nil
	}
}

// backingImage gives an Image the Size method qcow2.Backing asks for.
type backingImage struct{ *Image }

func (b backingImage) Size() int64 { return b.Image.Size }

func (c *chain) open(r io.ReaderAt, size int64, name string, host extent.Map, rf refs) (*Image, error) {
	f, fo := detect(r, size)
	if fo != nil {
		var off int64
		if fo == &dmg {
			off = size - 512
		}
		return nil, refusal(name, fo, off)
	}
	img := &Image{Format: f}
	switch f {
	case Raw:
		img.Size, img.ReaderAt, img.Map = size, r, host
	case QCOW2:
		q, err := qcow2.OpenWithBacking(r, size, name, rf.backing)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map, img.Detail = q.Size(), q, q, fmt.Sprintf("version %d", q.Version())
		if q.BackingFile != "" {
			img.Detail += ", backing file " + q.BackingFile
		}
	case VMDK:
		head := make([]byte, min(size, 512))
		r.ReadAt(head, 0)
		if vmdk.IsDescriptor(head) {
			d, err := vmdk.OpenDescriptor(r, size, name, rf.extents)
			if err != nil {
				return nil, err
			}
			c.closers = append(c.closers, d)
			img.Size, img.ReaderAt, img.Map, img.Detail = d.Size(), d, d, d.CreateType
			break
		}
		v, err := vmdk.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map, img.Detail = v.Size(), v, v, v.CreateType
	case VHD:
		v, err := vhd.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map, img.Detail = v.Size(), v, v, "dynamic"
		if v.Fixed() {
			img.Detail = "fixed"
			img.Map = clipped{host, v.Size()}
		}
		if creator, ok := v.SizedByGeometry(); ok {
			img.Detail += fmt.Sprintf(", sized by its CHS geometry (made by %q)", strings.TrimRight(creator, " \x00"))
		}
	case VHDX:
		v, err := vhdx.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map = v.Size(), v, v
	case VDI:
		v, err := vdi.Open(r, size, name)
		if err != nil {
			return nil, err
		}
		img.Size, img.ReaderAt, img.Map = v.Size(), v, v
	case OVA:
		return c.openOVA(r, size, name, host)
	}
	return img, nil
}

// extentOpener opens the extent files a VMDK descriptor at path names,
// from the descriptor's directory (the vmdk package has refused names
// that leave it; symlinks that do are refused here).
func (c *chain) extentOpener(path string) vmdk.Opener {
	dir := filepath.Dir(path)
	return func(name string) (io.ReaderAt, int64, io.Closer, error) {
		real, err := c.resolve(name, dir, "extent")
		if err != nil {
			return nil, 0, nil, err
		}
		f, err := os.Open(real)
		if err != nil {
			return nil, 0, nil, err
		}
		fi, err := f.Stat()
		if err != nil || !fi.Mode().IsRegular() {
			f.Close()
			if err == nil {
				err = fmt.Errorf("%s is not a regular file", name)
			}
			return nil, 0, nil, err
		}
		return f, fi.Size(), f, nil
	}
}

// openOVA opens the one disk of the OVA in r, in place: its member is
// read through a section of r.
func (c *chain) openOVA(r io.ReaderAt, size int64, name string, host extent.Map) (*Image, error) {
	if c.inOVA {
		return nil, vdio.Unsupported(name, OVA, 0, "an OVA inside an OVA: extract the inner one first")
	}
	p, err := ova.Read(r, size, name)
	if err != nil {
		return nil, err
	}
	base := filepath.Base(name)
	if len(p.Disks) > 1 {
		labels := make([]string, len(p.Disks))
		for i, d := range p.Disks {
			labels[i] = d.Label()
		}
		return nil, vdio.Unsupported(name, OVA, p.Descriptor.Offset, "the OVA holds %d disks, %s: sauve reads an OVA of one disk; extract them ('tar -xf %s') and back up or convert each disk",
			len(p.Disks), strings.Join(labels, ", "), base)
	}
	d := p.Disks[0]
	if d.File == nil {
		return nil, vdio.Errorf(name, OVA, p.Descriptor.Offset, "its only disk, %s, has no file: a blank disk holds nothing to read", d.ID)
	}
	m := d.File
	sec := io.NewSectionReader(r, m.Offset, m.Size)
	inner := fmt.Sprintf("%s, member %s at byte %d", name, m.Name, m.Offset)
	f, fo := detect(sec, m.Size)
	switch {
	case fo != nil:
		return nil, vdio.Unsupported(name, OVA, m.Offset, "disk %s, member %s, is %s: extract it ('tar -xf %s') and see what to do with it", d.ID, m.Name, fo.what, base)
	case f == OVA:
		return nil, vdio.Unsupported(name, OVA, m.Offset, "disk %s, member %s, is itself an OVA: extract it first ('tar -xf %s')", d.ID, m.Name, base)
	case strings.Contains(strings.ToLower(d.Format), "vmdk") && f != VMDK:
		return nil, vdio.Errorf(name, OVA, m.Offset, "disk %s, member %s, is a VMDK by the descriptor (%s), but it has no VMDK header (damaged?)", d.ID, m.Name, trimURI(d.Format))
	}
	var sub extent.Map
	if host != nil {
		sub = shifted{host, m.Offset, m.Size}
	}
	c.inOVA = true
	img, err := c.open(sec, m.Size, inner, sub, ovaRefs(p, r, m.Name))
	c.inOVA = false
	if err != nil {
		return nil, err
	}
	img.Detail = strings.TrimSpace("disk " + m.Name + ", " + img.Format + " " + img.Detail)
	img.Format = OVA
	return img, nil
}

func trimURI(s string) string {
	if len(s) > 100 {
		return s[:100] + "..."
	}
	return s
}

// ovaRefs opens what a disk inside an OVA refers to: VMDK extents are
// members of the archive, beside the descriptor; backing files are
// refused.
func ovaRefs(p *ova.Package, r io.ReaderAt, member string) refs {
	dir := path.Dir(member)
	return refs{
		backing: func(file, _ string) (qcow2.Backing, error) {
			return nil, fmt.Errorf("a disk inside an OVA cannot have a backing file: %w", vdio.ErrUnsupported)
		},
		extents: func(name string) (io.ReaderAt, int64, io.Closer, error) {
			m, ok := p.Lookup(path.Join(dir, name))
			if !ok {
				return nil, 0, nil, fmt.Errorf("the OVA holds no member %s", path.Join(dir, name))
			}
			return io.NewSectionReader(r, m.Offset, m.Size), m.Size, noClose{}, nil
		},
	}
}

// noClose is the closer of what needs no closing.
type noClose struct{}

func (noClose) Close() error { return nil }

// shifted is the map of a member of an OVA: the file's map from base,
// for n bytes.
type shifted struct {
	m       extent.Map
	base, n int64
}

func (s shifted) Data(off, n int64) ([]extent.Range, error) {
	n = min(n, s.n-off)
	if n <= 0 {
		return nil, nil
	}
	rs, err := s.m.Data(off+s.base, n)
	out := make([]extent.Range, len(rs))
	for i, r := range rs {
		out[i] = extent.Range{Start: r.Start - s.base, End: r.End - s.base}
	}
	return out, err
}
