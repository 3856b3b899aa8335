package source

import (
	"context"
	"io"
	"os"

	"github.com/sauve-backup/sauve/internal/extent"
)

// A View is what is read of a source: the source itself as it is (Live),
// or a point-in-time copy of it that a Provider made. Like a Source, it
// reads at any offset (At) or once in order (Stream), never both.
type View struct {
	// Of is the source this is a view of: messages name it, and the
	// snapshot records its path and kind.
	Of *Source
	// At reads the view at any offset; nil for a stream.
	At io.ReaderAt
	// Stream reads a stream once, in order; nil when At is set. Streams
	// have no copies: a Provider returns Live(src) for them.
	Stream io.Reader
	// Size is the view's size in bytes, -1 for a stream.
	Size int64
	// SectorSize is the logical sector size of the device read, 0 for a
	// file.
	SectorSize int
	// Holes, when set, is a file whose holes (SEEK_HOLE) hold no data
	// and are never read: the source when it is a sparse image file, or
	// a copy of one.
	Holes *os.File
	// Live says that the view is the source as it is, which others may
	// write to while it is read: the parts of it that are mounted
	// read-write are imaged in full. A frozen copy is not Live.
	Live bool
	// Copy names the point-in-time copy this is ("reflink"); empty for
	// the source as it is.
	Copy string
	// Release, when set, drops the copy; the Provider that made it sets
	// it, and the caller calls it once the view is no longer read.
	Release func() error
	// Data, when set, says which ranges of the view may hold data (the
	// copy's own allocation map, such as NBD block status): the rest
	// reads as zeros and is not read.
	Data extent.Map
	// Verify, when set, is called once the view has been read and before
	// the snapshot is stored: an error says that the copy did not hold
	// (its COW space ran out, a fleecing job failed), and nothing read
	// from it may be stored.
	Verify func() error
	// CopyUsed, when set, says how many bytes the copy takes now (the COW
	// space of a snapshot, a fleecing file); -1 when that is not known.
	CopyUsed func() int64
	// Changes, when set, says which ranges may differ from the disk of an
	// earlier snapshot: the rest holds what that disk held.
	Changes *Changes
	// Tracker, when set, names what records the writes made after the
	// instant of this view (a dirty bitmap), so that the next backup can
	// read only those: the snapshot's disk records it.
	Tracker string
	// FullRead, when set, says why a view that could have had Changes
	// has none (the earlier bitmap is missing or inconsistent).
	FullRead string
	// Readers is how many reads of At at once the copy serves better
	// than one after the other (a network export, where every read
	// waits a round trip); 0 or 1 reads in order.
	Readers int
}

// Changes are the ranges of a view that may differ from an earlier
// snapshot's disk, known from a change tracker (a dirty bitmap).
type Changes struct {
	// Since is the Tracker the earlier snapshot's disk recorded: only
	// that disk may be taken as the base.
	Since string
	// Map lists the ranges written since then.
	Map extent.Map
}

// Live is the view of src as it is, with no copy taken.
func Live(src *Source) *View {
	v := &View{Of: src, At: src.At, Stream: src.Stream, Size: src.Size, SectorSize: src.SectorSize, Live: true}
	if src.Kind == File {
		v.Holes = src.f
	}
	return v
}

// A Provider takes point-in-time copies: given the opened sources of one
// backup, it returns a view of each (in the same order), all taken at one
// instant, so that a machine's disks are captured together. Package
// shadow implements it for fsfreeze, LVM, btrfs, reflink and QEMU copies;
// a Provider that cannot copy a source returns Live(src) for it.
type Provider interface {
	Views(ctx context.Context, srcs []*Source) ([]*View, error)
}
