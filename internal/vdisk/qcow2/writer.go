package qcow2

import (
	"fmt"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// MaxSize is the largest virtual size the writer accepts (its L1 table
// stays in memory: 2 MiB for this size).
const MaxSize = 128 << 40

// Writer writes a qcow2 image from a disk that arrives in order.
type Writer struct {
	f        vdio.File
	size     int64
	cluster  int64
	bits     uint
	l2Per    int64
	l1       []uint64
	l1Off    int64
	next     int64 // next free cluster offset
	l2       []byte
	l2Index  int64 // L1 index of l2, -1 none
	out      *vdio.Appender
	units    *vdio.Units
	finished bool
}

// NewWriter starts a qcow2 image of the given virtual size in f, a new
// empty file.
func NewWriter(f vdio.File, size int64) (*Writer, error) { return newWriter(f, size, ClusterBits) }

// newWriter takes the cluster size too (tests make small images).
func newWriter(f vdio.File, size int64, clusterBits uint) (*Writer, error) {
	if size < 0 || size > MaxSize {
		return nil, fmt.Errorf("qcow2: virtual size %d out of range (at most %d)", size, int64(MaxSize))
	}
	w := &Writer{f: f, size: size, cluster: 1 << clusterBits, bits: clusterBits, l2Index: -1}
	w.l2Per = w.cluster / 8
	per := w.cluster * w.l2Per
	w.l1 = make([]uint64, (size+per-1)/per)
	w.l1Off = w.cluster
	l1Clusters := max(1, (int64(len(w.l1))*8+w.cluster-1)/w.cluster)
	w.next = w.l1Off + l1Clusters*w.cluster
	w.l2 = make([]byte, w.cluster)
	w.out = vdio.NewAppender(f, vdio.AppendBuffer)
	w.units = vdio.NewUnits(w.cluster, size, w.out, w.alloc)
	return w, nil
}

// alloc places data cluster i at the end of the file.
func (w *Writer) alloc(i int64) (int64, error) {
	l1i := i / w.l2Per
	if l1i != w.l2Index {
		if err := w.flushL2(); err != nil {
			return 0, err
		}
		w.l2Index = l1i
	}
	host := w.next
	w.next += w.cluster
	vdio.BE.PutUint64(w.l2[(i%w.l2Per)*8:], uint64(host)|flagCopied)
	return host, nil
}

// flushL2 appends the finished L2 table.
func (w *Writer) flushL2() error {
	if w.l2Index < 0 {
		return nil
	}
	host := w.next
	w.next += w.cluster
	if err := w.out.WriteAt(w.l2, host); err != nil {
		return err
	}
	w.l1[w.l2Index] = uint64(host) | flagCopied
	clear(w.l2)
	w.l2Index = -1
	return nil
}

// WriteAt writes p at virtual offset off; offsets must increase from call
// to call, and what is never written reads as zeros.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) { return w.units.WriteAt(p, off) }

// DataBytes returns how many bytes of non-zero data were written.
func (w *Writer) DataBytes() int64 { return w.units.Data }

// Close writes the tables and header. The image is valid only after it.
func (w *Writer) Close() error {
	if w.finished {
		return nil
	}
	w.finished = true
	if err := w.flushL2(); err != nil {
		return err
	}
	// Refcount table and blocks go at the end; they count themselves.
	used := w.next / w.cluster
	perBlock := w.cluster / 2 // 16-bit refcounts
	var rtClusters, blocks int64
	for {
		total := used + rtClusters + blocks
		nb := (total + perBlock - 1) / perBlock
		nt := (nb*8 + w.cluster - 1) / w.cluster
		if nb == blocks && nt == rtClusters {
			break
		}
		blocks, rtClusters = nb, nt
	}
	total := used + rtClusters + blocks
	rtOff := w.next
	blockOff := rtOff + rtClusters*w.cluster
	rt := make([]byte, rtClusters*w.cluster)
	for b := int64(0); b < blocks; b++ {
		vdio.BE.PutUint64(rt[8*b:], uint64(blockOff+b*w.cluster))
	}
	if err := w.out.WriteAt(rt, rtOff); err != nil {
		return err
	}
	rb := make([]byte, w.cluster)
	for b := int64(0); b < blocks; b++ {
		clear(rb)
		for k := int64(0); k < perBlock && b*perBlock+k < total; k++ {
			vdio.BE.PutUint16(rb[2*k:], 1)
		}
		if err := w.out.WriteAt(rb, blockOff+b*w.cluster); err != nil {
			return err
		}
	}
	end := blockOff + blocks*w.cluster
	// L1 table.
	l1 := make([]byte, int64(len(w.l1))*8)
	for i, e := range w.l1 {
		vdio.BE.PutUint64(l1[8*i:], e)
	}
	if err := w.out.WriteAt(l1, w.l1Off); err != nil {
		return err
	}
	// Header, version 3, last.
	h := make([]byte, w.cluster)
	vdio.BE.PutUint32(h[0:], magic)
	vdio.BE.PutUint32(h[4:], 3)
	vdio.BE.PutUint32(h[20:], uint32(w.bits))
	vdio.BE.PutUint64(h[24:], uint64(w.size))
	vdio.BE.PutUint32(h[36:], uint32(len(w.l1)))
	vdio.BE.PutUint64(h[40:], uint64(w.l1Off))
	vdio.BE.PutUint64(h[48:], uint64(rtOff))
	vdio.BE.PutUint32(h[56:], uint32(rtClusters))
	vdio.BE.PutUint32(h[96:], 4)    // refcount_order: 16 bits
	vdio.BE.PutUint32(h[100:], 112) // header_length
	// h[104] compression type 0 (deflate); then the end-of-extensions
	// marker (type 0, length 0) at 112.
	if err := w.out.WriteAt(h, 0); err != nil {
		return err
	}
	if err := w.out.Flush(); err != nil {
		return err
	}
	return w.f.Truncate(end)
}
