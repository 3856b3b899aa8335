package ntfs

import (
	"errors"
	"fmt"
)

// readCompressed reads a compressed stream: it is cut in compression
// units (16 clusters, usually), each all holes (zeros), all clusters
// (stored plain), or some clusters then holes (LZNT1 data in those
// clusters).
func (s *stream) readCompressed(p []byte, off int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(p) > 0 {
		u := off / s.unit
		if s.cached != u {
			if err := s.loadUnit(u); err != nil {
				return fmt.Errorf("compression unit %d: %w", u, err)
			}
		}
		n := copy(p, s.buf[off-u*s.unit:])
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// loadUnit fills s.buf with compression unit u.
func (s *stream) loadUnit(u int64) error {
	cs := s.f.cs
	if s.buf == nil {
		s.buf, s.scratch = make([]byte, s.unit), make([]byte, s.unit)
	}
	s.cached = -1
	first, n := u*s.unit/cs, s.unit/cs
	// The allocated clusters of the unit, which must come first.
	stored := s.scratch[:0]
	holes := false
	for vcn := first; vcn < first+n; {
		i := s.runAt(vcn)
		if i == len(s.runs) || s.runs[i].vcn > vcn {
			holes = true // past the runs: treated as holes
			break
		}
		r := s.runs[i]
		m := min(r.vcn+r.n, first+n) - vcn
		if r.lcn < 0 {
			holes = true
		} else {
			if holes {
				return errors.New("clusters after a hole in a compression unit (damaged)")
			}
			k := len(stored)
			stored = stored[:k+int(m*cs)]
			if err := s.f.readAt(stored[k:], (r.lcn+vcn-r.vcn)*cs); err != nil {
				return err
			}
		}
		vcn += m
	}
	switch {
	case len(stored) == 0:
		clear(s.buf)
	case !holes:
		copy(s.buf, stored)
	default:
		if err := lznt1(s.buf, stored); err != nil {
			return err
		}
	}
	s.cached = u
	return nil
}

// lznt1 decompresses src into dst, a compression unit: a series of
// chunks, each a 16-bit header (size, and whether compressed) then the
// data of 4096 bytes of output at most. What no chunk fills is zeros.
func lznt1(dst, src []byte) error {
	clear(dst)
	out := 0
	for len(src) >= 2 && out < len(dst) {
		h := int(le16(src, 0))
		if h == 0 {
			break
		}
		n := h&0xFFF + 1
		if 2+n > len(src) {
			return fmt.Errorf("LZNT1 chunk of %d bytes past the end of the unit", n)
		}
		chunk := src[2 : 2+n]
		src = src[2+n:]
		end := min(out+4096, len(dst))
		if h&0x8000 == 0 {
			copy(dst[out:end], chunk)
		} else if err := lznt1Chunk(dst[out:end], chunk); err != nil {
			return err
		}
		out = end
	}
	return nil
}

// lznt1Chunk decompresses one chunk: flag bytes, each telling of the 8
// tokens after it whether it is a literal byte or a 16-bit back
// reference whose split between offset and length grows with the
// position in the chunk.
func lznt1Chunk(dst, src []byte) error {
	pos := 0
	for i := 0; i < len(src); {
		flags := src[i]
		i++
		for bit := 0; bit < 8 && i < len(src); bit++ {
			if pos >= len(dst) {
				return errors.New("LZNT1 chunk decompresses past 4096 bytes")
			}
			if flags&(1<<bit) == 0 {
				dst[pos] = src[i]
				pos, i = pos+1, i+1
				continue
			}
			if i+2 > len(src) {
				return errors.New("LZNT1 back reference cut short")
			}
			tok := int(le16(src, i))
			i += 2
			lenBits := 12
			for p := pos - 1; p >= 0x10; p >>= 1 {
				lenBits--
			}
			back := tok>>lenBits + 1
			n := tok&(1<<lenBits-1) + 3
			if back > pos || n > len(dst)-pos {
				return fmt.Errorf("LZNT1 back reference (%d bytes back, %d long) at %d out of bounds", back, n, pos)
			}
			for k := range n { // overlapping copies repeat bytes
				dst[pos+k] = dst[pos-back+k]
			}
			pos += n
		}
	}
	return nil
}
