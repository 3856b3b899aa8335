package source

import (
	"fmt"
	"io"

	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/vdisk"
)

// Options say how a view is read as a disk.
type Options struct {
	// Raw reads the view's bytes as they are. Otherwise a VM disk image
	// (qcow2, vmdk, vhd, vhdx, vdi, the disk of an ova), recognised by
	// its headers, is read as the virtual disk it holds, and formats
	// sauve recognises but does not read are refused.
	Raw bool
	// AllowOutside follows qcow2 backing files and VMDK extents that lie
	// outside the image's folder (by default an image may refer only to
	// files in its folder or below).
	AllowOutside bool
}

// Disk is the disk a view holds: the view's own bytes (Format vdisk.Raw),
// or the virtual disk of a VM image, of which only the regions the image
// allocates hold data. It reads at any offset (At) or, for a stream, once
// in order (Stream), never both.
type Disk struct {
	View *View
	// Format is vdisk.Raw or the image format read; Detail says more
	// ("version 3", "streamOptimized").
	Format, Detail string
	// Size is the disk's size: an image's virtual size; -1 for a stream.
	Size   int64
	At     io.ReaderAt
	Stream io.Reader
	// Alloc says which ranges the container holds data for: the regions
	// an image allocates, or the data of a sparse file; nil: all of it.
	Alloc extent.Map

	img *vdisk.Image
}

// OpenDisk reads v as the disk it holds. Streams are read as they come:
// their format is not detected. Backing files and extents an image names
// are found relative to the source's path. The error for a format sauve
// does not read names the file, what it is and what to do.
func OpenDisk(v *View, o Options) (*Disk, error) {
	if v.At == nil {
		return &Disk{View: v, Format: vdisk.Raw, Size: -1, Stream: v.Stream}, nil
	}
	var holes extent.Map
	if v.Holes != nil {
		if m := extent.NewSparse(v.Holes, v.Size); m != nil {
			holes = m
		}
	}
	if v.Data != nil {
		holes = v.Data
	}
	raw := &Disk{View: v, Format: vdisk.Raw, Size: v.Size, At: v.At, Alloc: holes}
	if o.Raw {
		return raw, nil
	}
	// vdisk's errors name the image (or the backing file at fault).
	img, err := vdisk.OpenWith(v.At, v.Size, v.Of.Path, holes, vdisk.OpenOptions{AllowOutside: o.AllowOutside})
	if err != nil {
		return nil, err
	}
	if img.Format == vdisk.Raw {
		raw.img = img
		return raw, nil
	}
	return &Disk{View: v, Format: img.Format, Detail: img.Detail, Size: img.Size, At: img, Alloc: img.Map, img: img}, nil
}

// Close closes the files the disk opened besides its source: an image's
// backing files and extents. The source and the view are closed by
// whoever opened them.
func (d *Disk) Close() error {
	if d.img == nil {
		return nil
	}
	return d.img.Close()
}

// RefuseEmpty returns an error if the disk holds no byte (a VM image of
// a 0-byte disk): doing and hint are as for Source.RefuseEmpty.
func (d *Disk) RefuseEmpty(doing, hint string) error {
	if d.Size != 0 {
		return nil
	}
	return fmt.Errorf("source %s holds a disk of 0 bytes: refusing to %s (%s)", d.View.Of.Path, doing, hint)
}

// Stored returns the disk that at reads, of size bytes, as a raw disk
// whose data lies within alloc: a disk that sauve already holds (a
// snapshot's disk, read through the repository), mapped as a backup maps
// a source. name says what it is in messages. Nothing writes to it while
// it is read, so no mount is checked.
func Stored(name string, at io.ReaderAt, size int64, sectorSize int, alloc extent.Map) *Disk {
	src := &Source{Path: name, Kind: File, Size: size, At: at}
	v := &View{Of: src, At: at, Size: size, SectorSize: sectorSize}
	return &Disk{View: v, Format: vdisk.Raw, Size: size, At: at, Alloc: alloc}
}
