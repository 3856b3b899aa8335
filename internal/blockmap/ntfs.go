package blockmap

import (
	"encoding/binary"
	"fmt"
	"io"
	"sort"
)

// NTFS marks used clusters in the $Bitmap file (MFT record 6), whose
// location is described by a runlist in its MFT record. The reader checks
// that the volume is clean ($Volume not dirty, $LogFile without pending
// changes) before trusting the bitmap: Windows' fast startup and crashes
// leave changes in the log that the bitmap on disk does not show yet.

const (
	ntfsPageBytes = 32 << 10 // bytes of $Bitmap per page
	ntfsMaxRuns   = 1 << 20
	ntfsMaxExt    = 64 // extension records followed in an attribute list

	ntfsAttrList   = 0x20
	ntfsAttrVolInf = 0x70
	ntfsAttrData   = 0x80
)

type ntfsRun struct {
	vcn, lcn, n int64 // lcn < 0: sparse
}

type ntfsFS struct {
	r        io.ReaderAt
	warn     func(string)
	cluster  int64
	clusters int64
	recSize  int64
	mft      []ntfsRun
	bitmap   []ntfsRun
	buf      []byte
	pg       page
}

func probeNTFS(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	bs, err := read(r, 0, 512)
	if err != nil || bs == nil || string(bs[3:11]) != "NTFS    " {
		return nil, err
	}
	fs := &Filesystem{Type: "ntfs", UUID: fmt.Sprintf("%016X", le64(bs, 72))}
	bps := int64(le16(bs, 11))
	spc := int64(bs[13])
	if spc > 0x80 {
		spc = 1 << (256 - spc)
	}
	n := &ntfsFS{r: r, warn: warn, cluster: bps * spc}
	total := int64(le64(bs, 40))
	mftLCN := int64(le64(bs, 48))
	switch c := int8(bs[64]); {
	case c > 0:
		n.recSize = int64(c) * n.cluster
	case c > -31:
		n.recSize = 1 << -c
	}
	switch {
	case bps < 256 || bps > 4096 || bps&(bps-1) != 0 || spc == 0 || spc&(spc-1) != 0 || n.cluster > 2<<20:
		fs.Full = "boot sector damaged: sector or cluster size"
	case n.recSize < 256 || n.recSize > 64<<10 || n.recSize&(n.recSize-1) != 0:
		fs.Full = "boot sector damaged: MFT record size"
	case total <= 0 || total > size/bps:
		fs.Full = fmt.Sprintf("the filesystem (%d sectors) is larger than its partition (%d bytes)", total, size)
	}
	if fs.Full != "" {
		return fs, nil
	}
	n.clusters = total / spc
	// A last partial cluster is not part of the volume; it and the backup
	// boot sector after the volume are imaged with the partition's tail.
	fs.Size, fs.BlockSize = n.clusters*n.cluster, int(n.cluster)
	if mftLCN <= 0 || mftLCN >= n.clusters {
		fs.Full = "boot sector damaged: MFT location"
		return fs, nil
	}
	reason, err := n.open(mftLCN, fs)
	if err != nil {
		return nil, err
	}
	if reason != "" {
		fs.Full = reason
		return fs, nil
	}
	fs.m = &allocMap{unit: n.cluster, units: n.clusters, p: n}
	return fs, nil
}

// ntfsDamage is a reason the volume cannot be mapped.
type ntfsDamage string

func (e ntfsDamage) Error() string { return string(e) }

func (n *ntfsFS) open(mftLCN int64, fs *Filesystem) (string, error) {
	// Record 0 ($MFT) is at the MFT's start; its runlist places the rest.
	n.mft = []ntfsRun{{0, mftLCN, (n.recSize + n.cluster - 1) / n.cluster}}
	runs, err := n.dataRuns(0)
	if err != nil {
		return damage(err)
	}
	n.mft = runs
	if n.bitmap, err = n.dataRuns(6); err != nil {
		return damage(err)
	}
	var need int64
	for _, r := range n.bitmap {
		need = max(need, r.vcn+r.n)
	}
	if need*n.cluster < (n.clusters+7)/8 {
		return "$Bitmap is shorter than the volume", nil
	}
	vol, err := n.record(3)
	if err != nil {
		return damage(err)
	}
	if v := n.resident(vol, ntfsAttrVolInf); len(v) >= 12 {
		if le16(v, 10)&0x0001 != 0 {
			return "the volume is marked dirty: run chkdsk (or ntfsfix) first", nil
		}
	} else {
		return "$Volume has no volume information", nil
	}
	if v := n.resident(vol, 0x60); v != nil {
		fs.Label = utf16le(v)
	}
	clean, err := n.logClean()
	if err != nil {
		return damage(err)
	}
	if !clean {
		return "$LogFile holds changes not yet written in place (mounted, Windows fast startup or hibernation, or not cleanly unmounted)", nil
	}
	return "", nil
}

func damage(err error) (string, error) {
	if d, ok := err.(ntfsDamage); ok {
		return string(d), nil
	}
	if err == errShort {
		return "a metadata structure lies outside the volume", nil
	}
	return "", err
}

// readVCN reads len(b) bytes at byte offset off of a non-resident
// attribute with the given runs.
func (n *ntfsFS) readVCN(runs []ntfsRun, b []byte, off int64) error {
	for len(b) > 0 {
		vcn := off / n.cluster
		i := sort.Search(len(runs), func(i int) bool { return runs[i].vcn+runs[i].n > vcn })
		if i == len(runs) || runs[i].vcn > vcn {
			return ntfsDamage(fmt.Sprintf("cluster %d of a system file is not mapped", vcn))
		}
		r := runs[i]
		if r.lcn < 0 {
			return ntfsDamage("a system file is sparse")
		}
		in := off - r.vcn*n.cluster
		k := min(int64(len(b)), r.n*n.cluster-in)
		if err := readAt(n.r, b[:k], r.lcn*n.cluster+in); err != nil {
			return err
		}
		b, off = b[k:], off+k
	}
	return nil
}

// record reads MFT record i and applies its update sequence.
func (n *ntfsFS) record(i int64) ([]byte, error) {
	b := make([]byte, n.recSize)
	if err := n.readVCN(n.mft, b, i*n.recSize); err != nil {
		return nil, err
	}
	if string(b[:4]) != "FILE" {
		return nil, ntfsDamage(fmt.Sprintf("MFT record %d has no FILE signature", i))
	}
	if err := fixup(b); err != nil {
		return nil, ntfsDamage(fmt.Sprintf("MFT record %d: %v", i, err))
	}
	if le16(b, 22)&1 == 0 {
		return nil, ntfsDamage(fmt.Sprintf("MFT record %d is not in use", i))
	}
	return b, nil
}

// fixup checks and undoes the update sequence that protects each 512
// bytes of a multi-sector structure.
func fixup(b []byte) error {
	off, count := int(le16(b, 4)), int(le16(b, 6))
	if count < 2 || off+2*count > len(b) || (count-1)*512 > len(b) {
		return fmt.Errorf("bad update sequence")
	}
	usn := b[off : off+2]
	for k := 1; k < count; k++ {
		end := k*512 - 2
		if b[end] != usn[0] || b[end+1] != usn[1] {
			return fmt.Errorf("torn write (update sequence mismatch)")
		}
		copy(b[end:end+2], b[off+2*k:])
	}
	return nil
}

type ntfsAttr struct {
	typ      uint32
	nonRes   bool
	named    bool
	body     []byte // the whole attribute
	lowVCN   int64
	dataSize int64
}

// attrs lists the attributes of a record.
func attrs(rec []byte) ([]ntfsAttr, error) {
	var out []ntfsAttr
	off := int(le16(rec, 20))
	used := min(int(le32(rec, 24)), len(rec))
	for off+8 <= used {
		typ := le32(rec, off)
		if typ == 0xFFFFFFFF {
			return out, nil
		}
		l := int(le32(rec, off+4))
		if l < 24 || off+l > used || l%8 != 0 {
			return nil, ntfsDamage("attribute runs past its record")
		}
		a := ntfsAttr{typ: typ, nonRes: rec[off+8] != 0, named: rec[off+9] != 0, body: rec[off : off+l]}
		if a.nonRes {
			if l < 64 {
				return nil, ntfsDamage("short non-resident attribute")
			}
			a.lowVCN = int64(le64(a.body, 16))
			a.dataSize = int64(le64(a.body, 48))
		}
		out = append(out, a)
		off += l
	}
	return nil, ntfsDamage("attribute list of a record has no end marker")
}

// resident returns the value of a resident attribute of type typ.
func (n *ntfsFS) resident(rec []byte, typ uint32) []byte {
	as, err := attrs(rec)
	if err != nil {
		return nil
	}
	for _, a := range as {
		if a.typ == typ && !a.nonRes && len(a.body) >= 24 {
			vl, vo := int(le32(a.body, 16)), int(le16(a.body, 20))
			if vo+vl <= len(a.body) {
				return a.body[vo : vo+vl]
			}
		}
	}
	return nil
}

// dataRuns returns the runlist of the unnamed $DATA of MFT record i,
// following an attribute list into extension records.
func (n *ntfsFS) dataRuns(i int64) ([]ntfsRun, error) {
	rec, err := n.record(i)
	if err != nil {
		return nil, err
	}
	as, err := attrs(rec)
	if err != nil {
		return nil, err
	}
	var runs []ntfsRun
	var list []byte
	for _, a := range as {
		switch {
		case a.typ == ntfsAttrData && !a.named && a.nonRes:
			rs, err := n.decodeRuns(a)
			if err != nil {
				return nil, err
			}
			runs = append(runs, rs...)
		case a.typ == ntfsAttrList:
			if list, err = n.attrValue(a); err != nil {
				return nil, err
			}
		}
	}
	if list != nil {
		seen := map[int64]bool{i: true}
		for off := 0; off+26 <= len(list); {
			l := int(le16(list, off+4))
			if l < 26 || off+l > len(list) {
				return nil, ntfsDamage("attribute list entry runs past the list")
			}
			typ, named, ref := le32(list, off), list[off+6] != 0, int64(le64(list, off+16)&(1<<48-1))
			off += l
			if typ != ntfsAttrData || named || seen[ref] {
				continue
			}
			if len(seen) > ntfsMaxExt {
				return nil, ntfsDamage("attribute list names too many records")
			}
			seen[ref] = true
			ext, err := n.record(ref)
			if err != nil {
				return nil, err
			}
			eas, err := attrs(ext)
			if err != nil {
				return nil, err
			}
			for _, a := range eas {
				if a.typ == ntfsAttrData && !a.named && a.nonRes {
					rs, err := n.decodeRuns(a)
					if err != nil {
						return nil, err
					}
					runs = append(runs, rs...)
					if i == 0 {
						n.mft = append(n.mft, rs...) // later extensions may lie in this extent
						sort.Slice(n.mft, func(a, b int) bool { return n.mft[a].vcn < n.mft[b].vcn })
					}
				}
			}
		}
	}
	if len(runs) == 0 {
		return nil, ntfsDamage(fmt.Sprintf("MFT record %d has no data runs", i))
	}
	sort.Slice(runs, func(a, b int) bool { return runs[a].vcn < runs[b].vcn })
	for k := 1; k < len(runs); k++ {
		if runs[k].vcn < runs[k-1].vcn+runs[k-1].n {
			return nil, ntfsDamage(fmt.Sprintf("runs of MFT record %d overlap", i))
		}
	}
	return runs, nil
}

// attrValue returns a (small) attribute's value, resident or not.
func (n *ntfsFS) attrValue(a ntfsAttr) ([]byte, error) {
	if !a.nonRes {
		vl, vo := int(le32(a.body, 16)), int(le16(a.body, 20))
		if vo+vl > len(a.body) {
			return nil, ntfsDamage("resident value runs past its attribute")
		}
		return a.body[vo : vo+vl], nil
	}
	if a.dataSize < 0 || a.dataSize > 1<<20 {
		return nil, ntfsDamage("attribute list too large")
	}
	rs, err := n.decodeRuns(a)
	if err != nil {
		return nil, err
	}
	b := make([]byte, a.dataSize)
	if err := n.readVCN(rs, b, 0); err != nil {
		return nil, err
	}
	return b, nil
}

// decodeRuns decodes a non-resident attribute's mapping pairs.
func (n *ntfsFS) decodeRuns(a ntfsAttr) ([]ntfsRun, error) {
	p := int(le16(a.body, 32))
	if p >= len(a.body) {
		return nil, ntfsDamage("mapping pairs outside their attribute")
	}
	b := a.body[p:]
	var out []ntfsRun
	vcn, lcn := a.lowVCN, int64(0)
	for len(b) > 0 && b[0] != 0 {
		ls, os := int(b[0]&0xF), int(b[0]>>4)
		if ls == 0 || ls > 8 || os > 8 || 1+ls+os > len(b) {
			return nil, ntfsDamage("bad mapping pair")
		}
		length := int64(leUint(b[1 : 1+ls]))
		if length <= 0 || length > n.clusters || vcn > n.clusters || len(out) >= ntfsMaxRuns {
			return nil, ntfsDamage("bad run length")
		}
		r := ntfsRun{vcn: vcn, lcn: -1, n: length}
		if os > 0 {
			lcn += leInt(b[1+ls : 1+ls+os])
			if lcn < 0 || lcn >= n.clusters || length > n.clusters-lcn {
				return nil, ntfsDamage("a run points outside the volume")
			}
			r.lcn = lcn
		}
		out = append(out, r)
		vcn += length
		b = b[1+ls+os:]
	}
	return out, nil
}

func leUint(b []byte) uint64 {
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func leInt(b []byte) int64 {
	v := leUint(b)
	shift := 64 - 8*uint(len(b))
	return int64(v<<shift) >> shift
}

func utf16le(b []byte) string {
	u := make([]rune, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		u = append(u, rune(binary.LittleEndian.Uint16(b[i:])))
	}
	return cString([]byte(string(u)))
}

// logClean reads the restart pages of $LogFile.
func (n *ntfsFS) logClean() (bool, error) {
	runs, err := n.dataRuns(2)
	if err != nil {
		return false, err
	}
	head := make([]byte, 8192)
	if err := n.readVCN(runs, head, 0); err != nil {
		return false, err
	}
	empty := true
	for _, c := range head {
		if c != 0xFF {
			empty = false
			break
		}
	}
	if empty {
		return true, nil
	}
	var best []byte
	var bestLSN uint64
	for off := 0; off < len(head); {
		pg := head[off:]
		if string(pg[:4]) != "RSTR" {
			if off == 0 && string(pg[:4]) != "CHKD" {
				return false, nil
			}
			break
		}
		sys := int(le32(pg, 16))
		if sys < 512 || sys > len(pg) || sys&(sys-1) != 0 {
			return false, nil
		}
		p := append([]byte(nil), pg[:sys]...)
		if fixup(p) != nil {
			return false, nil
		}
		ra := int(le16(p, 24))
		if ra+16 > len(p) {
			return false, nil
		}
		if lsn := le64(p, ra); best == nil || lsn > bestLSN {
			best, bestLSN = p[ra:], lsn
		}
		off += sys
	}
	if best == nil {
		return false, nil
	}
	inUse, flags := le16(best, 12), le16(best, 14)
	return inUse == 0xFFFF || flags&0x0002 != 0, nil
}

// page implements pager: ntfsPageBytes of $Bitmap at a time.
func (n *ntfsFS) page(u int64) (*page, error) {
	per := int64(ntfsPageBytes * 8)
	first := u / per * per
	cnt := min(per, n.clusters-first)
	n.pg = page{first: first, n: cnt}
	if n.buf == nil {
		n.buf = make([]byte, ntfsPageBytes)
	}
	b := n.buf[:(cnt+7)/8]
	if err := n.readVCN(n.bitmap, b, first/8); err != nil {
		if _, ok := err.(ntfsDamage); ok || err == errShort {
			n.warn(fmt.Sprintf("$Bitmap for clusters %d-%d cannot be read (%v): imaged in full", first, first+cnt-1, err))
			n.pg.all = true
			return &n.pg, nil
		}
		return nil, fmt.Errorf("ntfs $Bitmap: %w", err)
	}
	n.pg.bits = b
	return &n.pg, nil
}
