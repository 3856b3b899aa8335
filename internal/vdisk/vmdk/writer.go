package vmdk

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zlib"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// MaxSize is the largest virtual size the writers accept: 2 TiB, the
// limit of a hosted sparse extent (grain offsets are 32-bit sector
// numbers).
const MaxSize = 2 << 40

// Options of the descriptor.
type Options struct {
	// FileName is the extent's file name written into the descriptor.
	FileName string
	// Adapter is the ddb.adapterType: ide (default), lsilogic, buslogic,
	// lsisas1068, pvscsi.
	Adapter string
}

func descriptor(createType string, sectors int64, o Options) []byte {
	adapter := o.Adapter
	if adapter == "" {
		adapter = "ide"
	}
	heads, secs := 16, 63
	if adapter != "ide" {
		heads, secs = 255, 63
	}
	cyl := min(sectors/int64(heads*secs), 16383)
	var cid [4]byte
	rand.Read(cid[:])
	extType := "SPARSE"
	return fmt.Appendf(nil, `# Disk DescriptorFile
version=1
CID=%08x
parentCID=ffffffff
createType="%s"

# Extent description
RW %d %s "%s"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "%d"
ddb.geometry.heads = "%d"
ddb.geometry.sectors = "%d"
ddb.adapterType = "%s"
`, binary.LittleEndian.Uint32(cid[:])|1, createType, sectors, extType, o.FileName, cyl, heads, secs, adapter)
}

const descSectors = 20

// SparseWriter writes a monolithicSparse disk from a disk that arrives
// in order.
type SparseWriter struct {
	f        vdio.File
	size     int64
	grain    int64
	n        int64 // grain tables
	gd       []uint32
	rgdOff   int64 // sectors
	gdOff    int64
	rgtBase  int64
	gtBase   int64
	next     int64 // bytes
	gt       []byte
	gtIndex  int64
	out      *vdio.Appender
	units    *vdio.Units
	hdr      header
	desc     []byte
	finished bool
}

// NewSparseWriter starts a monolithicSparse disk of size bytes (a
// multiple of 512) in f.
func NewSparseWriter(f vdio.File, size int64, o Options) (*SparseWriter, error) {
	return newSparseWriter(f, size, o, GrainSectors)
}

// newSparseWriter takes the grain size too (tests make small images).
func newSparseWriter(f vdio.File, size int64, o Options, grainSectors int64) (*SparseWriter, error) {
	if size < 0 || size > MaxSize || size%sector != 0 {
		return nil, fmt.Errorf("vmdk: virtual size %d must be a multiple of 512 up to %d", size, int64(MaxSize))
	}
	w := &SparseWriter{f: f, size: size, grain: grainSectors * sector, gtIndex: -1}
	perGT := int64(gtEntries) * w.grain
	w.n = (size + perGT - 1) / perGT
	gdSectors := (w.n*4 + sector - 1) / sector
	gtSectors := int64(gtEntries * 4 / sector)
	w.rgdOff = 1 + descSectors
	w.rgtBase = w.rgdOff + gdSectors
	w.gdOff = w.rgtBase + w.n*gtSectors
	w.gtBase = w.gdOff + gdSectors
	overhead := (w.gtBase + w.n*gtSectors + grainSectors - 1) / grainSectors * grainSectors
	w.next = overhead * sector
	w.gd = make([]uint32, w.n)
	w.gt = make([]byte, gtEntries*4)
	w.hdr = header{
		version: 1, flags: flagNL | flagRGD, capacity: uint64(size / sector), grain: uint64(grainSectors),
		descOff: 1, descSize: descSectors, gtes: gtEntries,
		rgdOff: uint64(w.rgdOff), gdOff: uint64(w.gdOff), overhead: uint64(overhead),
	}
	w.desc = descriptor("monolithicSparse", size/sector, o)
	if len(w.desc) > descSectors*sector {
		return nil, errors.New("vmdk: descriptor too long (file name?)")
	}
	w.out = vdio.NewAppender(f, vdio.AppendBuffer)
	w.units = vdio.NewUnits(w.grain, size, w.out, w.alloc)
	return w, nil
}

func (w *SparseWriter) alloc(i int64) (int64, error) {
	ti := i / gtEntries
	if ti != w.gtIndex {
		if err := w.flushGT(); err != nil {
			return 0, err
		}
		w.gtIndex = ti
	}
	host := w.next
	if (host+w.grain)/sector > 0xffffffff {
		return 0, fmt.Errorf("vmdk: the sparse extent would exceed 2 TiB: use qcow2 or vhdx")
	}
	w.next += w.grain
	vdio.LE.PutUint32(w.gt[(i%gtEntries)*4:], uint32(host/sector))
	return host, nil
}

func (w *SparseWriter) flushGT() error {
	if w.gtIndex < 0 {
		return nil
	}
	gtSectors := int64(gtEntries * 4 / sector)
	if err := w.out.WriteAt(w.gt, (w.rgtBase+w.gtIndex*gtSectors)*sector); err != nil {
		return err
	}
	if err := w.out.WriteAt(w.gt, (w.gtBase+w.gtIndex*gtSectors)*sector); err != nil {
		return err
	}
	clear(w.gt)
	w.gtIndex = -1
	return nil
}

// WriteAt writes p at virtual offset off; offsets increase from call to
// call.
func (w *SparseWriter) WriteAt(p []byte, off int64) (int, error) { return w.units.WriteAt(p, off) }

// DataBytes returns how many bytes of non-zero data were written.
func (w *SparseWriter) DataBytes() int64 { return w.units.Data }

// Close writes the grain directories and the header.
func (w *SparseWriter) Close() error {
	if w.finished {
		return nil
	}
	w.finished = true
	if err := w.flushGT(); err != nil {
		return err
	}
	gtSectors := int64(gtEntries * 4 / sector)
	gdBytes := (w.n*4 + sector - 1) / sector * sector
	rgd, gd := make([]byte, gdBytes), make([]byte, gdBytes)
	for i := int64(0); i < w.n; i++ {
		vdio.LE.PutUint32(rgd[4*i:], uint32(w.rgtBase+i*gtSectors))
		vdio.LE.PutUint32(gd[4*i:], uint32(w.gtBase+i*gtSectors))
	}
	if err := w.out.WriteAt(rgd, w.rgdOff*sector); err != nil {
		return err
	}
	if err := w.out.WriteAt(gd, w.gdOff*sector); err != nil {
		return err
	}
	hd := make([]byte, (1+descSectors)*sector)
	w.hdr.put(hd)
	copy(hd[sector:], w.desc)
	if err := w.out.WriteAt(hd, 0); err != nil {
		return err
	}
	if err := w.out.Flush(); err != nil {
		return err
	}
	return w.f.Truncate(max(w.next, int64(w.hdr.overhead)*sector))
}

// StreamWriter writes a streamOptimized disk, sequentially, to an
// io.Writer. Grains are compressed in parallel and written in order.
type StreamWriter struct {
	w        io.Writer
	pos      int64 // bytes written
	size     int64
	grain    int64
	gd       []uint32
	gt       []uint32
	gtIndex  int64
	cur      []byte // grain being filled
	curIdx   int64  // its index, -1 none
	next     int64  // lowest offset for the next write
	hdr      header
	finished bool
	data     int64

	level int
	jobs  chan *grainJob
	order chan *grainJob
	wg    sync.WaitGroup
	done  chan struct{}
	errMu sync.Mutex
	werr  error
	bufs  chan []byte
}

type grainJob struct {
	idx  int64
	in   []byte
	out  bytes.Buffer
	done chan struct{}
}

// NewStreamWriter starts a streamOptimized disk of size bytes (a multiple
// of 512) on w.
func NewStreamWriter(w io.Writer, size int64, o Options) (*StreamWriter, error) {
	return newStreamWriter(w, size, o, GrainSectors)
}

// newStreamWriter takes the grain size too (tests make small images).
func newStreamWriter(w io.Writer, size int64, o Options, grainSectors int64) (*StreamWriter, error) {
	if size < 0 || size > MaxSize || size%sector != 0 {
		return nil, fmt.Errorf("vmdk: virtual size %d must be a multiple of 512 up to %d", size, int64(MaxSize))
	}
	s := &StreamWriter{w: w, size: size, grain: grainSectors * sector, gtIndex: -1, curIdx: -1, level: zlib.DefaultCompression}
	perGT := int64(gtEntries) * s.grain
	s.gd = make([]uint32, (size+perGT-1)/perGT)
	s.gt = make([]uint32, gtEntries)
	s.hdr = header{
		version: 3, flags: flagNL | flagComp | flagMarkers, capacity: uint64(size / sector), grain: uint64(grainSectors),
		descOff: 1, descSize: descSectors, gtes: gtEntries, gdOff: gdAtEnd, compress: 1,
	}
	s.hdr.overhead = (1 + descSectors + uint64(grainSectors) - 1) / uint64(grainSectors) * uint64(grainSectors)
	desc := descriptor("streamOptimized", size/sector, o)
	if len(desc) > descSectors*sector {
		return nil, errors.New("vmdk: descriptor too long (file name?)")
	}
	hd := make([]byte, s.hdr.overhead*sector)
	s.hdr.put(hd)
	copy(hd[sector:], desc)
	if err := s.write(hd); err != nil {
		return nil, err
	}
	workers := runtime.GOMAXPROCS(0)
	s.jobs = make(chan *grainJob, workers)
	s.order = make(chan *grainJob, 2*workers)
	s.bufs = make(chan []byte, 4*workers)
	s.done = make(chan struct{})
	for range workers {
		s.wg.Add(1)
		go s.compressor()
	}
	go s.emitter()
	return s, nil
}

func (s *StreamWriter) write(b []byte) error {
	if err := s.err(); err != nil {
		return err
	}
	n, err := s.w.Write(b)
	s.pos += int64(n)
	if err != nil {
		s.setErr(err)
	}
	return err
}

func (s *StreamWriter) err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.werr
}

func (s *StreamWriter) setErr(err error) {
	s.errMu.Lock()
	if s.werr == nil {
		s.werr = err
	}
	s.errMu.Unlock()
}

func (s *StreamWriter) compressor() {
	defer s.wg.Done()
	zw, _ := zlib.NewWriterLevel(io.Discard, s.level)
	for j := range s.jobs {
		j.out.Reset()
		zw.Reset(&j.out)
		zw.Write(j.in)
		zw.Close()
		close(j.done)
	}
}

// emitter writes compressed grains in order and the grain tables as
// their ranges complete.
func (s *StreamWriter) emitter() {
	defer close(s.done)
	var m [12]byte
	pad := make([]byte, sector)
	for j := range s.order {
		<-j.done
		select {
		case s.bufs <- j.in[:cap(j.in)]:
		default:
		}
		if s.err() != nil {
			continue
		}
		if ti := j.idx / gtEntries; ti != s.gtIndex {
			s.flushGT()
			s.gtIndex = ti
		}
		s.gt[j.idx%gtEntries] = uint32(s.pos / sector)
		binary.LittleEndian.PutUint64(m[:], uint64(j.idx*s.grain/sector))
		binary.LittleEndian.PutUint32(m[8:], uint32(j.out.Len()))
		s.write(m[:])
		s.write(j.out.Bytes())
		if r := s.pos % sector; r != 0 {
			s.write(pad[:sector-r])
		}
	}
}

func (s *StreamWriter) marker(val uint64, typ uint32) {
	m := make([]byte, sector)
	binary.LittleEndian.PutUint64(m, val)
	binary.LittleEndian.PutUint32(m[12:], typ)
	s.write(m)
}

func (s *StreamWriter) flushGT() {
	if s.gtIndex < 0 {
		return
	}
	s.marker(gtEntries*4/sector, markerGT)
	s.gd[s.gtIndex] = uint32(s.pos / sector)
	b := make([]byte, gtEntries*4)
	for i, e := range s.gt {
		binary.LittleEndian.PutUint32(b[4*i:], e)
	}
	s.write(b)
	clear(s.gt)
	s.gtIndex = -1
}

// submit queues the current grain for compression if it holds data.
func (s *StreamWriter) submit() {
	if s.curIdx < 0 {
		return
	}
	n := min(s.grain, s.size-s.curIdx*s.grain)
	if !extent.IsZero(s.cur[:n]) {
		// Whole grains are compressed, the tail of the last one zeros.
		j := &grainJob{idx: s.curIdx, in: s.cur, done: make(chan struct{})}
		s.data += n
		s.order <- j
		s.jobs <- j
		s.cur = nil
	} else {
		clear(s.cur)
	}
	s.curIdx = -1
}

// WriteAt writes p at virtual offset off; offsets increase from call to
// call.
func (s *StreamWriter) WriteAt(p []byte, off int64) (int, error) {
	if err := s.err(); err != nil {
		return 0, err
	}
	if off < s.next {
		return 0, fmt.Errorf("write at %d after %d: %w", off, s.next, vdio.ErrOrder)
	}
	if off+int64(len(p)) > s.size {
		return 0, fmt.Errorf("write of %d bytes at %d past the virtual size %d", len(p), off, s.size)
	}
	n := len(p)
	s.next = off + int64(n)
	for len(p) > 0 {
		gi := off / s.grain
		if gi != s.curIdx {
			s.submit()
			if extent.IsZero(p[:min(int64(len(p)), (gi+1)*s.grain-off)]) {
				k := min(int64(len(p)), (gi+1)*s.grain-off)
				p, off = p[k:], off+k
				continue
			}
			if s.cur == nil {
				select {
				case s.cur = <-s.bufs:
				default:
					s.cur = make([]byte, s.grain)
				}
				clear(s.cur)
			}
			s.curIdx = gi
		}
		k := copy(s.cur[off-gi*s.grain:], p)
		p, off = p[k:], off+int64(k)
	}
	return n, s.err()
}

// DataBytes returns how many bytes of non-zero grains were written.
func (s *StreamWriter) DataBytes() int64 { return s.data }

// Close writes the last grains, the grain directory, footer and
// end-of-stream marker.
func (s *StreamWriter) Close() error {
	if s.finished {
		return s.err()
	}
	s.finished = true
	s.submit()
	close(s.jobs)
	close(s.order)
	s.wg.Wait()
	<-s.done
	s.flushGT()
	gdBytes := (int64(len(s.gd))*4 + sector - 1) / sector * sector
	s.marker(uint64(gdBytes/sector), markerGD)
	gdOff := s.pos / sector
	b := make([]byte, gdBytes)
	for i, e := range s.gd {
		binary.LittleEndian.PutUint32(b[4*i:], e)
	}
	s.write(b)
	s.marker(1, markerFooter)
	f := s.hdr
	f.gdOff = uint64(gdOff)
	fb := make([]byte, sector)
	f.put(fb)
	s.write(fb)
	s.write(make([]byte, sector)) // end of stream
	return s.err()
}

// Abort stops the compressors after a failure.
func (s *StreamWriter) Abort() {
	if !s.finished {
		s.setErr(errors.New("aborted"))
		_ = s.Close()
	}
}
