package blockmap

import "io"

// An XFS log whose last record is not an unmount record holds metadata
// changes, free-space tree updates among them, that are not yet in place:
// the trees on disk may call blocks free that files use. Free space is
// skipped only when the log is provably clean, which is what xfs_repair
// checks too: the newest record, just before the log's head, is an
// unmount record, written after everything else was put in place.

const (
	xlogMagic        = 0xFEEDBABE
	xlogUnmountTrans = 0x20
	xlogClientLog    = 0xAA
	xlogScan         = 4096 // basic blocks: more than the in-flight iclogs
)

type xfsLog struct {
	r   io.ReaderAt
	off int64 // byte offset of the log
	n   int64 // length in 512-byte basic blocks
	bb  []byte
}

func (l *xfsLog) read(i int64) ([]byte, error) {
	if l.bb == nil {
		l.bb = make([]byte, 512)
	}
	if err := readAt(l.r, l.bb, l.off+i*512); err != nil {
		return nil, err
	}
	return l.bb, nil
}

func (l *xfsLog) cycle(i int64) (uint32, error) {
	b, err := l.read(i)
	if err != nil {
		return 0, err
	}
	if be32(b, 0) == xlogMagic {
		return be32(b, 4), nil // a record header: its h_cycle
	}
	return be32(b, 0), nil
}

// xfsAssumeCleanLog lets the fuzz tests reach the free-space trees with
// seeds too small to hold a log.
var xfsAssumeCleanLog bool

// logClean reports whether the internal log is clean, and if not why.
func (x *xfsFS) logClean(sb []byte, agblklog byte) (bool, string, error) {
	if xfsAssumeCleanLog {
		return true, "", nil
	}
	const dirty = "its log holds changes not yet written in place (mounted, or not cleanly unmounted): the free-space trees on disk may be stale; mount and unmount it, or run xfs_repair"
	start, blocks := be64(sb, 48), uint64(be32(sb, 96))
	if start == 0 {
		return false, "its log is on an external device, whose state cannot be checked", nil
	}
	agno, agbno := start>>agblklog, start&(uint64(1)<<agblklog-1)
	lstart := agno*x.agblocks + agbno
	if agno >= x.agcount || agbno >= x.agblocks || blocks == 0 || lstart+blocks > x.dblocks {
		return false, "superblock damaged: the log lies outside the filesystem", nil
	}
	l := &xfsLog{r: x.r, off: int64(lstart) * x.bs, n: int64(blocks) * x.bs / 512}
	ok, err := l.clean()
	if err != nil {
		if err == errShort {
			return false, dirty, nil
		}
		return false, "", err
	}
	if !ok {
		return false, dirty, nil
	}
	return true, "", nil
}

func (l *xfsLog) clean() (bool, error) {
	c0, err := l.cycle(0)
	if err != nil {
		return false, err
	}
	cl, err := l.cycle(l.n - 1)
	if err != nil {
		return false, err
	}
	var head int64 // first block past the newest record
	switch {
	case c0 == cl:
		head = l.n
	case cl+1 == c0:
		lo, hi := int64(0), l.n-1 // cycle(lo) == c0, cycle(hi) != c0
		for hi-lo > 1 {
			m := (lo + hi) / 2
			c, err := l.cycle(m)
			if err != nil {
				return false, err
			}
			if c == c0 {
				lo = m
			} else {
				hi = m
			}
		}
		head = hi
		// Nothing of the current cycle may lie past the head (a record
		// written in pieces), and nothing older just before it.
		for i := head; i < min(head+xlogScan, l.n); i++ {
			if c, err := l.cycle(i); err != nil || c == c0 {
				return false, err
			}
		}
	default:
		return false, nil
	}
	for i := max(head-xlogScan, 0); i < head; i++ {
		if c, err := l.cycle(i); err != nil || c != c0 {
			return false, err
		}
	}
	// The newest record header before the head.
	for i := head - 1; i >= 0 && i >= head-xlogScan; i-- {
		b, err := l.read(i)
		if err != nil {
			return false, err
		}
		if be32(b, 0) != xlogMagic {
			continue
		}
		cyc, version, hlen := be32(b, 4), be32(b, 8), int64(be32(b, 12))
		lsn, nops, hsize := be64(b, 16), be32(b, 40), int64(be32(b, 320))
		hdrBBs := int64(1)
		if version&2 != 0 && hsize > 32768 {
			hdrBBs = (hsize + 32767) / 32768
		}
		if cyc != c0 || lsn != uint64(cyc)<<32|uint64(i) || nops != 1 ||
			i+hdrBBs+(hlen+511)/512 != head {
			return false, nil
		}
		d, err := l.read(i + hdrBBs)
		if err != nil {
			return false, err
		}
		return d[8] == xlogClientLog && d[9]&xlogUnmountTrans != 0, nil
	}
	return false, nil
}
