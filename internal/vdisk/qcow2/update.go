package qcow2

import (
	"errors"
	"fmt"
	"github.com/sauve-backup/sauve/internal/extent"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
)

// The Updater changes a version 3 image in place, at random offsets, for
// a migration that rewrites a target pass after pass. Clusters and L2
// tables are only ever allocated at the end of the file and never freed
// or reused, so a write never lands in space that metadata still on disk
// gives to something else. Sync makes the image valid on disk in an
// order that keeps it so through a crash: data, then refcount blocks,
// then the refcount table (a new one through the header), then L2
// tables, then the L1 table, with an fsync between each. A crash between
// two Syncs loses the writes since the first and leaves at worst
// clusters counted but not referenced (qemu-img check reports them as
// leaked); later passes allocate after them and do not add to them.
//
// Zero keeps a zeroed cluster allocated and sets its L2 entry's zero
// flag: the space is not returned, and a later write goes to the same
// cluster.

// UpdateFile is the image file an Updater changes.
type UpdateFile = vdio.RWFile

// maxCachedL2 bounds the L2 tables kept between Syncs (clean ones are
// dropped beyond it).
const maxCachedL2 = 256

// Updater is a qcow2 image open for random-access updates. It is not safe
// for concurrent use.
type Updater struct {
	f          UpdateFile
	name       string
	size       int64
	cluster    int64
	l2Per      int64
	perBlock   int64 // refcounts per refcount block
	l1Off      int64
	l1         []uint64 // L2 table offsets, 0 when none
	l1Dirty    map[int64]bool
	l2         map[int64][]uint64 // L2 tables by L1 index
	l2Dirty    map[int64]bool
	rtOff      int64
	rtClusters int64
	rt         []uint64 // refcount block offsets
	rtDirty    map[int64]bool
	refs       []uint16 // refcount of each host cluster
	refDirty   map[int64]bool
	next       int64 // where the next cluster is allocated
	data       bool  // data written since the last Sync
	zeros      []byte
	buf        []byte
	closed     bool
	used       []uint64 // at open: a bit a cluster, for overlaps
}

// OpenUpdate opens the qcow2 image in f for updates. It refuses, with
// why, images it cannot change safely: version 2, compressed clusters,
// backing files, external data files, encryption, extended L2 entries,
// refcounts other than 16 bits, internal snapshots, and images marked
// dirty or corrupt.
func OpenUpdate(f UpdateFile, name string) (*Updater, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", name, err)
	}
	fsize := fi.Size()
	r, err := Open(f, fsize, name)
	if err != nil {
		return nil, err
	}
	if r.version != 3 {
		return nil, vdio.Unsupported(name, format, 4, "version 2 images cannot be updated in place: upgrade with 'qemu-img amend -o compat=1.1 %s'", name)
	}
	var h [104]byte
	if err := vdio.ReadFull(f, fsize, h[:], 0, name, format, "header"); err != nil {
		return nil, err
	}
	if err := refuseUpdate(h[:], name); err != nil {
		return nil, err
	}
	u := &Updater{f: f, name: name, size: r.size, cluster: r.cluster, l2Per: r.l2Entries,
		perBlock: r.cluster / 2, l1Off: int64(vdio.BE.Uint64(h[40:])),
		l1: r.l1, l1Dirty: map[int64]bool{}, l2: map[int64][]uint64{}, l2Dirty: map[int64]bool{},
		rtDirty: map[int64]bool{}, refDirty: map[int64]bool{},
		zeros: make([]byte, r.cluster), buf: make([]byte, r.cluster)}
	u.next = (fsize + u.cluster - 1) / u.cluster * u.cluster
	u.rtOff = int64(vdio.BE.Uint64(h[48:]))
	u.rtClusters = int64(vdio.BE.Uint32(h[56:]))
	u.used = make([]uint64, u.next/u.cluster/64+1)
	l1Bytes := max(int64(len(u.l1))*8, 1)
	if err := u.claim(0, 1, "header"); err != nil {
		return nil, err
	}
	if err := u.claim(u.l1Off, (l1Bytes+u.cluster-1)/u.cluster, "L1 table"); err != nil {
		return nil, err
	}
	if err := u.readRefcounts(fsize); err != nil {
		return nil, err
	}
	if err := u.checkClusters(fsize); err != nil {
		return nil, err
	}
	u.used = nil
	if vdio.BE.Uint64(h[88:]) != 0 {
		// Autoclear features (bitmaps) describe data this update
		// changes: the specification says to clear them.
		if _, err := f.WriteAt(make([]byte, 8), 88); err != nil {
			return nil, fmt.Errorf("%s: clear autoclear features: %w", name, err)
		}
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("%s: sync: %w", name, err)
		}
	}
	return u, nil
}

// refuseUpdate says why the header h describes an image this updater
// does not change.
func refuseUpdate(h []byte, name string) error {
	inc := vdio.BE.Uint64(h[72:])
	switch {
	case inc&incDirty != 0:
		return vdio.Unsupported(name, format, 72, "image is marked dirty (not closed cleanly): repair it with 'qemu-img check -r all %s' first", name)
	case inc&incExtendedL2 != 0:
		return vdio.Unsupported(name, format, 72, "images with extended L2 entries (subclusters) cannot be updated in place")
	case inc&incCompType != 0:
		return vdio.Unsupported(name, format, 72, "images with zstd compression cannot be updated in place")
	case vdio.BE.Uint32(h[96:]) != 4:
		return vdio.Unsupported(name, format, 96, "refcounts of %d bits cannot be updated in place (only 16)", 1<<vdio.BE.Uint32(h[96:]))
	case vdio.BE.Uint32(h[60:]) != 0:
		return vdio.Unsupported(name, format, 60, "images with internal snapshots cannot be updated in place: delete them first ('qemu-img snapshot -d')")
	}
	return nil
}

// claim marks n clusters from off as used by what, refusing an image
// where two things share a cluster: an update of one would change the
// other.
func (u *Updater) claim(off, n int64, what string) error {
	for c := off / u.cluster; c < off/u.cluster+n; c++ {
		if c >= int64(len(u.used))*64 || u.used[c/64]&(1<<(c%64)) != 0 {
			return vdio.Unsupported(u.name, format, off, "%s at %d overlaps other metadata or data, or lies outside the file: check it with 'qemu-img check'", what, off)
		}
		u.used[c/64] |= 1 << (c % 64)
	}
	return nil
}

// readRefcounts loads the refcount table and blocks.
func (u *Updater) readRefcounts(fsize int64) error {
	if u.rtOff <= 0 || u.rtOff%u.cluster != 0 || u.rtClusters <= 0 || u.rtClusters > fsize/u.cluster || u.rtOff > fsize-u.rtClusters*u.cluster {
		return vdio.Errorf(u.name, format, 48, "refcount table at %d (%d clusters) is not inside the file", u.rtOff, u.rtClusters)
	}
	if err := u.claim(u.rtOff, u.rtClusters, "refcount table"); err != nil {
		return err
	}
	tb := make([]byte, u.rtClusters*u.cluster)
	if err := vdio.ReadFull(u.f, fsize, tb, u.rtOff, u.name, format, "refcount table"); err != nil {
		return err
	}
	u.refs = make([]uint16, u.next/u.cluster)
	blk := make([]byte, u.cluster)
	for i := int64(0); i < int64(len(tb))/8; i++ {
		off := int64(vdio.BE.Uint64(tb[8*i:]) & offsetMask)
		if off == 0 {
			continue
		}
		if off%u.cluster != 0 || off > fsize-u.cluster {
			return vdio.Errorf(u.name, format, u.rtOff+8*i, "refcount block %d at %d is not inside the file", i, off)
		}
		for len(u.rt) <= int(i) {
			u.rt = append(u.rt, 0)
		}
		u.rt[i] = uint64(off)
		if err := u.claim(off, 1, "refcount block"); err != nil {
			return err
		}
		if err := vdio.ReadFull(u.f, fsize, blk, off, u.name, format, "refcount block"); err != nil {
			return err
		}
		for k := int64(0); k < u.perBlock; k++ {
			if c := i*u.perBlock + k; c < int64(len(u.refs)) {
				u.refs[c] = vdio.BE.Uint16(blk[2*k:])
			}
		}
	}
	return nil
}

// checkClusters reads every L2 table and refuses entries this updater
// cannot change in place: compressed clusters, and clusters shared
// (refcount other than 1).
func (u *Updater) checkClusters(fsize int64) error {
	for i, off := range u.l1 {
		if off == 0 {
			continue
		}
		if int64(off) > fsize-u.cluster || u.ref(int64(off)) != 1 {
			return vdio.Unsupported(u.name, format, u.l1Off+8*int64(i), "L2 table %d at %d is outside the file or shared", i, off)
		}
		if err := u.claim(int64(off), 1, "L2 table"); err != nil {
			return err
		}
		t, err := u.readL2(int64(off))
		if err != nil {
			return err
		}
		for j, e := range t {
			if e&flagCompressed != 0 {
				return vdio.Unsupported(u.name, format, int64(off)+8*int64(j), "image has compressed clusters, which cannot be updated in place: decompress it with 'qemu-img convert -O qcow2'")
			}
			h := int64(e & offsetMask)
			if h == 0 {
				continue
			}
			if h%u.cluster != 0 || h > fsize-u.cluster || u.ref(h) != 1 {
				return vdio.Unsupported(u.name, format, int64(off)+8*int64(j), "cluster at %d is unaligned, outside the file or shared", h)
			}
			if err := u.claim(h, 1, "data cluster"); err != nil {
				return err
			}
		}
	}
	return nil
}

func (u *Updater) readL2(off int64) ([]uint64, error) {
	fi, err := u.f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", u.name, err)
	}
	b := make([]byte, u.cluster)
	if err := vdio.ReadFull(u.f, fi.Size(), b, off, u.name, format, "L2 table"); err != nil {
		return nil, err
	}
	t := make([]uint64, u.l2Per)
	for i := range t {
		t[i] = vdio.BE.Uint64(b[8*i:])
	}
	return t, nil
}

// CreateUpdate makes an empty image of size bytes in f, a new file, and
// opens it for updates.
func CreateUpdate(f UpdateFile, size int64, name string) (*Updater, error) {
	w, err := NewWriter(f, size)
	if err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("create %s: sync: %w", name, err)
	}
	return OpenUpdate(f, name)
}

// Size returns the virtual size.
func (u *Updater) Size() int64 { return u.size }

func (u *Updater) ref(off int64) uint16 {
	if c := off / u.cluster; c < int64(len(u.refs)) {
		return u.refs[c]
	}
	return 0
}

// setRef sets the refcount of the cluster at off, allocating the
// refcount block that holds it if there is none.
func (u *Updater) setRef(off int64, v uint16) {
	c := off / u.cluster
	for int64(len(u.refs)) <= c {
		u.refs = append(u.refs, 0)
	}
	u.refs[c] = v
	b := c / u.perBlock
	u.refDirty[b] = true
	for int64(len(u.rt)) <= b {
		u.rt = append(u.rt, 0)
	}
	if u.rt[b] == 0 {
		blk := u.next
		u.next += u.cluster
		u.rt[b] = uint64(blk)
		u.rtDirty[b] = true
		u.setRef(blk, 1)
	}
}

// alloc takes a cluster at the end of the file.
func (u *Updater) alloc() int64 {
	off := u.next
	u.next += u.cluster
	u.setRef(off, 1)
	return off
}

// entry returns the L2 entry of virtual cluster vi.
func (u *Updater) entry(vi int64) (uint64, error) {
	t, err := u.table(vi/u.l2Per, false)
	if t == nil || err != nil {
		return 0, err
	}
	return t[vi%u.l2Per], nil
}

// table returns L2 table i, reading it, or, with create, making it if
// there is none (nil otherwise).
func (u *Updater) table(i int64, create bool) ([]uint64, error) {
	if t, ok := u.l2[i]; ok {
		return t, nil
	}
	if u.l1[i] == 0 {
		if !create {
			return nil, nil
		}
		t := make([]uint64, u.l2Per)
		u.l1[i] = uint64(u.alloc())
		u.l1Dirty[i] = true
		u.l2[i], u.l2Dirty[i] = t, true
		return t, nil
	}
	t, err := u.readL2(int64(u.l1[i]))
	if err != nil {
		return nil, err
	}
	u.l2[i] = t
	return t, nil
}

func (u *Updater) setEntry(vi int64, e uint64) error {
	t, err := u.table(vi/u.l2Per, true)
	if err != nil {
		return err
	}
	t[vi%u.l2Per] = e
	u.l2Dirty[vi/u.l2Per] = true
	return nil
}

func (u *Updater) bounds(off, n int64) error {
	if u.closed {
		return errors.New("qcow2: updater is closed")
	}
	if off < 0 || n < 0 || off > u.size-n {
		return fmt.Errorf("%s: %d bytes at %d lie outside the virtual size %d", u.name, n, off, u.size)
	}
	return nil
}

// WriteAt writes p at virtual offset off.
func (u *Updater) WriteAt(p []byte, off int64) (int, error) {
	if err := u.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		vi, within := (off+int64(done))/u.cluster, (off+int64(done))%u.cluster
		k := min(int64(len(p)-done), u.cluster-within)
		if err := u.writeCluster(vi, within, p[done:done+int(k)]); err != nil {
			return done, err
		}
		done += int(k)
	}
	return done, nil
}

// writeCluster writes p at within in virtual cluster vi.
func (u *Updater) writeCluster(vi, within int64, p []byte) error {
	e, err := u.entry(vi)
	if err != nil {
		return err
	}
	host := int64(e & offsetMask)
	zero := host == 0 || e&flagZero != 0
	if zero && extent.IsZero(p) {
		return nil
	}
	out, at := p, host+within
	if zero {
		if host == 0 {
			host = u.alloc()
		}
		if int64(len(p)) < u.cluster {
			copy(u.buf, u.zeros)
			copy(u.buf[within:], p)
			out = u.buf
		}
		at = host
	}
	if _, err := u.f.WriteAt(out, at); err != nil {
		return fmt.Errorf("%s: write cluster at %d: %w", u.name, at, err)
	}
	u.data = true
	if zero {
		return u.setEntry(vi, uint64(host)|flagCopied)
	}
	return nil
}

// Zero makes [off, off+n) read as zeros: whole clusters by their L2
// entry's zero flag (staying allocated), parts of clusters by writing
// zeros.
func (u *Updater) Zero(off, n int64) error {
	if err := u.bounds(off, n); err != nil {
		return err
	}
	for n > 0 {
		vi, within := off/u.cluster, off%u.cluster
		k := min(n, u.cluster-within)
		e, err := u.entry(vi)
		if err != nil {
			return err
		}
		host := int64(e & offsetMask)
		whole := within == 0 && (k == u.cluster || off+k == u.size)
		switch {
		case host == 0 || e&flagZero != 0:
			// Reads as zeros already.
		case whole:
			if err := u.setEntry(vi, uint64(host)|flagCopied|flagZero); err != nil {
				return err
			}
		default:
			if _, err := u.f.WriteAt(u.zeros[:k], host+within); err != nil {
				return fmt.Errorf("%s: zero at %d: %w", u.name, host+within, err)
			}
			u.data = true
		}
		off, n = off+k, n-k
	}
	return nil
}

func (u *Updater) sync(what string) error {
	if err := u.f.Sync(); err != nil {
		return fmt.Errorf("%s: sync %s: %w", u.name, what, err)
	}
	return nil
}

// Sync makes every write and zeroing so far durable, leaving a valid
// image on disk.
func (u *Updater) Sync() error {
	if u.closed {
		return errors.New("qcow2: updater is closed")
	}
	meta := len(u.refDirty)+len(u.l2Dirty)+len(u.l1Dirty) > 0
	if !u.data && !meta {
		return nil
	}
	var moved []int64 // clusters of a refcount table replaced
	if int64(len(u.rt))*8 > u.rtClusters*u.cluster {
		moved = u.growTable()
	}
	fi, err := u.f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", u.name, err)
	}
	if fi.Size() < u.next {
		// Every counted cluster lies inside the file.
		if err := u.f.Truncate(u.next); err != nil {
			return fmt.Errorf("%s: extend: %w", u.name, err)
		}
	}
	if err := u.sync("data"); err != nil {
		return err
	}
	steps := []func() error{u.writeBlocks, u.writeTable, u.writeL2, u.writeL1}
	names := []string{"refcount blocks", "refcount table", "L2 tables", "L1 table"}
	for i, step := range steps {
		if err := step(); err != nil {
			return err
		}
		if err := u.sync(names[i]); err != nil {
			return err
		}
	}
	u.data = false
	if moved != nil {
		for _, c := range moved {
			u.setRef(c, 0)
		}
		if err := u.writeBlocks(); err != nil {
			return err
		}
		if err := u.sync("refcount blocks"); err != nil {
			return err
		}
	}
	if len(u.l2) > maxCachedL2 {
		clear(u.l2)
	}
	return nil
}

// growTable allocates a larger refcount table at the end of the file
// (written by writeTable) and returns the clusters of the old one.
func (u *Updater) growTable() []int64 {
	var old []int64
	for c := int64(0); c < u.rtClusters; c++ {
		old = append(old, u.rtOff+c*u.cluster)
	}
	for int64(len(u.rt))*8 > u.rtClusters*u.cluster {
		// Room to spare: the new table's own refcounts may need blocks.
		n := (int64(len(u.rt))*8+u.cluster-1)/u.cluster + 1
		// Contiguous: the clusters are taken before their refcounts
		// (which may take blocks) are set.
		u.rtOff, u.rtClusters = u.next, n
		u.next += n * u.cluster
		for k := range n {
			u.setRef(u.rtOff+k*u.cluster, 1)
		}
	}
	for i := range u.rt {
		u.rtDirty[int64(i)] = true
	}
	u.rtDirty[-1] = true // the header
	return old
}

func (u *Updater) writeBlocks() error {
	b := make([]byte, u.cluster)
	for i := range u.refDirty {
		clear(b)
		for k := int64(0); k < u.perBlock; k++ {
			if c := i*u.perBlock + k; c < int64(len(u.refs)) {
				vdio.BE.PutUint16(b[2*k:], u.refs[c])
			}
		}
		if _, err := u.f.WriteAt(b, int64(u.rt[i])); err != nil {
			return fmt.Errorf("%s: write refcount block %d: %w", u.name, i, err)
		}
	}
	clear(u.refDirty)
	return nil
}

func (u *Updater) writeTable() error {
	if u.rtDirty[-1] {
		tb := make([]byte, u.rtClusters*u.cluster)
		for i, e := range u.rt {
			vdio.BE.PutUint64(tb[8*i:], e)
		}
		if _, err := u.f.WriteAt(tb, u.rtOff); err != nil {
			return fmt.Errorf("%s: write refcount table: %w", u.name, err)
		}
		if err := u.sync("refcount table"); err != nil {
			return err
		}
		var h [12]byte
		vdio.BE.PutUint64(h[:], uint64(u.rtOff))
		vdio.BE.PutUint32(h[8:], uint32(u.rtClusters))
		if _, err := u.f.WriteAt(h[:], 48); err != nil {
			return fmt.Errorf("%s: write header: %w", u.name, err)
		}
		clear(u.rtDirty)
		return nil
	}
	var e [8]byte
	for i := range u.rtDirty {
		vdio.BE.PutUint64(e[:], u.rt[i])
		if _, err := u.f.WriteAt(e[:], u.rtOff+8*i); err != nil {
			return fmt.Errorf("%s: write refcount table: %w", u.name, err)
		}
	}
	clear(u.rtDirty)
	return nil
}

func (u *Updater) writeL2() error {
	b := make([]byte, u.cluster)
	for i := range u.l2Dirty {
		for j, e := range u.l2[i] {
			vdio.BE.PutUint64(b[8*j:], e)
		}
		if _, err := u.f.WriteAt(b, int64(u.l1[i])); err != nil {
			return fmt.Errorf("%s: write L2 table %d: %w", u.name, i, err)
		}
	}
	clear(u.l2Dirty)
	return nil
}

func (u *Updater) writeL1() error {
	var e [8]byte
	for i := range u.l1Dirty {
		vdio.BE.PutUint64(e[:], u.l1[i]|flagCopied)
		if _, err := u.f.WriteAt(e[:], u.l1Off+8*i); err != nil {
			return fmt.Errorf("%s: write L1 entry %d: %w", u.name, i, err)
		}
	}
	clear(u.l1Dirty)
	return nil
}

// Close syncs the image; the caller closes the file.
func (u *Updater) Close() error {
	if u.closed {
		return nil
	}
	err := u.Sync()
	u.closed = true
	return err
}
