package ntfs

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/sauve-backup/sauve/internal/extent"
)

// stream is the content of one attribute: a resident value, or runs of
// clusters (holes among them), plain or LZNT1-compressed. It is the
// fsread.File of a regular file.
type stream struct {
	f        *FS
	rec      uint64
	resident []byte
	runs     []run
	size     int64
	init     int64 // bytes past this read as zeros
	unit     int64 // bytes of a compression unit; 0: not compressed

	mu      sync.Mutex
	cached  int64 // compression unit held in buf; -1: none
	buf     []byte
	scratch []byte
}

// dataStream opens the stream named name of $DATA of rec ("": the unnamed
// one, a regular file's content).
func (f *FS) dataStream(rec *record, name string) (*stream, error) {
	segs := rec.all(atData, name)
	if len(segs) == 0 {
		if name == "" {
			// A file without $DATA (ntfs-3g never makes one) reads as empty.
			return &stream{f: f, rec: rec.num, cached: -1}, nil
		}
		return nil, fmt.Errorf("MFT record %d has no stream %q", rec.num, name)
	}
	return f.newStream(rec.num, segs)
}

// newStream joins the segments of one attribute into a stream.
func (f *FS) newStream(num uint64, segs []*attr) (*stream, error) {
	sort.Slice(segs, func(i, j int) bool { return segs[i].lowVCN < segs[j].lowVCN })
	a := segs[0]
	s := &stream{f: f, rec: num, size: a.size, init: a.init, cached: -1}
	if a.flags&attrEncrypted != 0 {
		return nil, fmt.Errorf("MFT record %d: encrypted (EFS) file not supported", num)
	}
	if a.resident {
		if len(segs) > 1 {
			return nil, fmt.Errorf("MFT record %d: a resident attribute in %d segments", num, len(segs))
		}
		s.resident = a.value
		return s, nil
	}
	next := int64(0)
	for _, g := range segs {
		if g.resident || g.lowVCN != next {
			return nil, fmt.Errorf("MFT record %d: attribute segments do not follow each other (VCN %d expected, %d found)", num, next, g.lowVCN)
		}
		s.runs = append(s.runs, g.runs...)
		next = g.highVCN + 1
	}
	if s.size > next*f.cs {
		return nil, fmt.Errorf("MFT record %d: %d bytes of data in %d clusters (damaged size)", num, s.size, next)
	}
	if a.flags&attrCompressed != 0 {
		if a.compUnit == 0 || a.compUnit > 8 || f.cs > 4096 {
			return nil, fmt.Errorf("MFT record %d: compression units of 2^%d clusters of %d bytes not supported", num, a.compUnit, f.cs)
		}
		s.unit = f.cs << a.compUnit
	}
	return s, nil
}

// Size is the stream's length in bytes.
func (s *stream) Size() int64 { return s.size }

// readFull reads len(p) bytes at off, which must lie within the stream.
func (s *stream) readFull(p []byte, off int64) error {
	if off < 0 || off > s.size || int64(len(p)) > s.size-off {
		return fmt.Errorf("read of %d bytes at %d past the end of a stream of %d bytes", len(p), off, s.size)
	}
	_, err := s.ReadAt(p, off)
	return err
}

// ReadAt reads the stream; past the initialized size it reads zeros.
func (s *stream) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= s.size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > s.size-off {
		n = int(s.size - off)
	}
	q := p[:n]
	if z := s.init - off; z < int64(n) {
		z = max(z, 0)
		clear(q[z:])
		q = q[:z]
	}
	var err error
	switch {
	case s.resident != nil || s.runs == nil:
		copy(q, s.resident[min(int64(len(s.resident)), off):])
	case s.unit > 0:
		err = s.readCompressed(q, off)
	default:
		err = s.readRuns(q, off)
	}
	if err != nil {
		return 0, fmt.Errorf("MFT record %d: %w", s.rec, err)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// runAt is the index of the run holding cluster vcn, or len(runs).
func (s *stream) runAt(vcn int64) int {
	return sort.Search(len(s.runs), func(i int) bool { return s.runs[i].vcn+s.runs[i].n > vcn })
}

// readRuns reads uncompressed clusters.
func (s *stream) readRuns(p []byte, off int64) error {
	cs := s.f.cs
	for len(p) > 0 {
		vcn := off / cs
		i := s.runAt(vcn)
		if i == len(s.runs) || s.runs[i].vcn > vcn {
			return fmt.Errorf("no run maps cluster %d", vcn)
		}
		r := s.runs[i]
		m := min(int64(len(p)), (r.vcn+r.n)*cs-off)
		if r.lcn < 0 {
			clear(p[:m])
		} else if err := s.f.readAt(p[:m], (r.lcn+vcn-r.vcn)*cs+off%cs); err != nil {
			return err
		}
		p, off = p[m:], off+m
	}
	return nil
}

// Data lists the byte ranges that hold data: what runs map to clusters,
// up to the initialized size.
func (s *stream) Data() ([]extent.Range, error) {
	end := min(s.size, s.init)
	var out []extent.Range
	add := func(a, b int64) {
		b = min(b, end)
		if a >= b {
			return
		}
		if k := len(out); k > 0 && out[k-1].End >= a {
			out[k-1].End = max(out[k-1].End, b)
			return
		}
		out = append(out, extent.Range{Start: a, End: b})
	}
	if s.runs == nil {
		add(0, end)
		return out, nil
	}
	cs := s.f.cs
	for _, r := range s.runs {
		if s.unit > 0 {
			// A compression unit holds data if any of its clusters is
			// allocated: add whole units.
			if r.lcn >= 0 {
				add(r.vcn*cs/s.unit*s.unit, ((r.vcn+r.n)*cs+s.unit-1)/s.unit*s.unit)
			}
			continue
		}
		if r.lcn >= 0 {
			add(r.vcn*cs, (r.vcn+r.n)*cs)
		}
	}
	return out, nil
}
