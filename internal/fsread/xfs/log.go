package xfs

import (
	"errors"
	"fmt"
)

// The log is a ring of 512-byte basic blocks, each stamped with the
// cycle (the number of times the ring was written around) in its first
// word, or, for a record header, in its second. The head is where the
// cycle drops; a cleanly unmounted filesystem's last record, ending at
// the head, holds one operation: an unmount record.
const (
	bbSize          = 512
	logHeaderMagic  = 0xFEEDBABE
	logUnmountTrans = 0x20
	logCycleSize    = 32 << 10 // the data one header block describes
	maxLogScan      = 4096     // basic blocks searched back from the head for its last record
)

// logGeom is the internal log: n basic blocks from base, its head, and
// the block of the last record before the head.
type logGeom struct {
	f       *FS
	base, n int64
	head    int64
	lastRec int64
	buf     []byte
}

func (lg *logGeom) bb(i int64) ([]byte, error) {
	if i < 0 || i >= lg.n {
		return nil, fmt.Errorf("log block %d of %d", i, lg.n)
	}
	return lg.buf, lg.f.readAt(lg.buf, lg.base+i*bbSize)
}

func (lg *logGeom) cycle(i int64) (uint32, error) {
	b, err := lg.bb(i)
	if err != nil {
		return 0, err
	}
	if be32(b, 0) == logHeaderMagic {
		return be32(b, 4), nil
	}
	return be32(b, 0), nil
}

// recordSize is how many header blocks a record header h has (a v2 log
// with records over 32 KiB needs more) and how many bytes of data follow.
func (lg *logGeom) recordSize(h []byte) (hblks, dataLen int64) {
	hblks = 1
	if be32(h, 8)&2 != 0 {
		if sz := int64(be32(h, 320)); sz > logCycleSize {
			hblks = (sz + logCycleSize - 1) / logCycleSize
		}
	}
	return hblks, int64(int32(be32(h, 12)))
}

// logClean says whether the internal log's head holds an unmount record;
// it returns the log's geometry for a replay.
func (f *FS) logClean() (bool, *logGeom, error) {
	s := &f.sb
	if s.logstart == 0 {
		return false, nil, errors.New("external log")
	}
	base, err := f.fsbOffset(s.logstart, s.logblocks)
	if err != nil || s.logblocks == 0 {
		return false, nil, fmt.Errorf("log: %v", err)
	}
	lg := &logGeom{f: f, base: base, n: int64(s.logblocks) * s.bs / bbSize, buf: make([]byte, bbSize)}
	n := lg.n
	first, err := lg.cycle(0)
	if err != nil {
		return false, nil, err
	}
	last, err := lg.cycle(n - 1)
	if err != nil {
		return false, nil, err
	}
	// The head: the first block whose cycle is not the first block's
	// (the blocks before it were written in this pass of the ring).
	lg.head = n
	if first != last {
		lo, hi := int64(0), n-1 // cycle(lo) == first, cycle(hi) != first
		for hi-lo > 1 {
			mid := lo + (hi-lo)/2
			c, err := lg.cycle(mid)
			if err != nil {
				return false, nil, err
			}
			if c == first {
				lo = mid
			} else {
				hi = mid
			}
		}
		lg.head = hi
	}
	// The last record before the head.
	for back := int64(1); back <= min(n, maxLogScan); back++ {
		i := (lg.head - back + n) % n
		b, err := lg.bb(i)
		if err != nil {
			return false, nil, err
		}
		if be32(b, 0) != logHeaderMagic {
			continue
		}
		lg.lastRec = i
		hblks, dataLen := lg.recordSize(b)
		ops := be32(b, 40)
		if (i+hblks+(dataLen+bbSize-1)/bbSize)%n != lg.head%n || ops != 1 {
			return false, lg, nil
		}
		op, err := lg.bb((i + hblks) % n)
		if err != nil {
			return false, nil, err
		}
		return op[9]&logUnmountTrans != 0, lg, nil
	}
	return false, nil, errors.New("no log record found before the head")
}
