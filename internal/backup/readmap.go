package backup

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/sauve-backup/sauve/internal/extent"
)

// A read map records which ranges of a disk a backup read (the rest it
// stored as zeros), so that the next backup of the disk can read them
// again: a block freed since (a deleted file) still holds what was read,
// and reading it keeps the chunk that held it unchanged, where reading it
// as zeros would store the chunk anew although no used block of it
// changed. The map is a hint kept on the machine (see docs/FORMAT.md,
// "Read maps"), never in the repository: reading more than the data map
// says is always safe, so a wrong or missing read map costs bytes, never
// a wrong backup.
//
// Layout: readMapMagic, the disk's size as a uvarint, then one pair of
// uvarints per range, in increasing order: the gap from the end of the
// previous range (from 0 for the first) and the range's length.

const readMapMagic = "sauve read map 1\n"

// ReadMapWriter writes a read map, a chunk at a time in disk order, to w.
type ReadMapWriter struct {
	w    *bufio.Writer
	size int64
	next int64 // end of the chunks recorded
	last int64 // end of the last range written
	cur  extent.Range
	err  error
}

// NewReadMapWriter starts the read map of a disk of size bytes.
func NewReadMapWriter(w io.Writer, size int64) *ReadMapWriter {
	m := &ReadMapWriter{w: bufio.NewWriter(w), size: size}
	_, m.err = m.w.WriteString(readMapMagic)
	m.uvarint(uint64(size))
	return m
}

func (m *ReadMapWriter) uvarint(v uint64) {
	if m.err != nil {
		return
	}
	var b [binary.MaxVarintLen64]byte
	_, m.err = m.w.Write(b[:binary.PutUvarint(b[:], v)])
}

// Chunk records that the chunk at off, n bytes long, was read in ranges
// (within it, in increasing order). Chunks come in disk order, each once.
func (m *ReadMapWriter) Chunk(off, n int64, ranges []extent.Range) error {
	if m.err != nil {
		return m.err
	}
	if off != m.next {
		m.err = fmt.Errorf("internal error: read map of chunk at %d after %d", off, m.next)
		return m.err
	}
	m.next = off + n
	for _, r := range ranges {
		if r.Start < off || r.End > off+n || r.Start < m.cur.End || r.Len() <= 0 {
			m.err = fmt.Errorf("internal error: read map range [%d, %d) in chunk [%d, %d)", r.Start, r.End, off, off+n)
			return m.err
		}
		if r.Start == m.cur.End && m.cur.Len() > 0 {
			m.cur.End = r.End
			continue
		}
		m.flush()
		m.cur = r
	}
	return m.err
}

func (m *ReadMapWriter) flush() {
	if m.cur.Len() > 0 {
		m.uvarint(uint64(m.cur.Start - m.last))
		m.uvarint(uint64(m.cur.Len()))
		m.last = m.cur.End
	}
}

// Close writes the rest; it fails unless every chunk of the disk was
// recorded.
func (m *ReadMapWriter) Close() error {
	if m.err == nil && m.next != m.size {
		m.err = fmt.Errorf("internal error: read map covers %d bytes of %d", m.next, m.size)
	}
	m.flush()
	if m.err == nil {
		m.err = m.w.Flush()
	}
	return m.err
}

// ReadMap is a read map read back, as an extent.Map whose windows come in
// increasing order (as the backup's plan asks for them); it holds one
// range at a time, whatever the disk's size.
type ReadMap struct {
	r    *bufio.Reader
	size int64
	last int64
	cur  extent.Range // the next range not wholly passed
	eof  bool
}

// OpenReadMap reads the header of a read map from r; size is the disk's,
// which the map must have been written for.
func OpenReadMap(r io.Reader, size int64) (*ReadMap, error) {
	br := bufio.NewReader(r)
	magic := make([]byte, len(readMapMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != readMapMagic {
		return nil, errors.New("not a read map")
	}
	got, err := binary.ReadUvarint(br)
	if err != nil {
		return nil, fmt.Errorf("read map header: %w", err)
	}
	if int64(got) != size {
		return nil, fmt.Errorf("read map of a disk of %d bytes, not %d", got, size)
	}
	return &ReadMap{r: br, size: size}, nil
}

// advance reads the next range into cur.
func (m *ReadMap) advance() error {
	gap, err := binary.ReadUvarint(m.r)
	if errors.Is(err, io.EOF) {
		m.eof, m.cur = true, extent.Range{}
		return nil
	}
	if err != nil {
		return fmt.Errorf("read map: %w", err)
	}
	n, err := binary.ReadUvarint(m.r)
	if err != nil {
		return fmt.Errorf("read map: %w", noEOF(err))
	}
	start := m.last + int64(gap)
	if gap > uint64(m.size) || n == 0 || n > uint64(m.size) || start+int64(n) > m.size || (m.last > 0 && gap == 0) {
		return errors.New("read map: range out of order or past the disk's end")
	}
	m.cur = extent.Range{Start: start, End: start + int64(n)}
	m.last = m.cur.End
	return nil
}

func noEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Data implements extent.Map.
func (m *ReadMap) Data(off, n int64) ([]extent.Range, error) {
	var out []extent.Range
	end := off + n
	for {
		if m.cur.End <= off && !m.eof {
			if err := m.advance(); err != nil {
				return nil, err
			}
			continue
		}
		if m.eof || m.cur.Start >= end {
			return out, nil
		}
		out = append(out, extent.Range{Start: max(m.cur.Start, off), End: min(m.cur.End, end)})
		if m.cur.End > end {
			return out, nil
		}
		if err := m.advance(); err != nil {
			return nil, err
		}
	}
}

// clearOutside zeroes the bytes of buf (the window at off) outside ranges.
func clearOutside(buf []byte, off int64, ranges []extent.Range) {
	pos := off
	for _, r := range ranges {
		clear(buf[pos-off : r.Start-off])
		pos = r.End
	}
	clear(buf[pos-off:])
}
