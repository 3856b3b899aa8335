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

// logClean says whether the internal log's head holds an unmount record.
func (f *FS) logClean() (bool, error) {
	s := &f.sb
	if s.logstart == 0 {
		return false, errors.New("external log")
	}
	base, err := f.fsbOffset(s.logstart, s.logblocks)
	if err != nil || s.logblocks == 0 {
		return false, fmt.Errorf("log: %v", err)
	}
	n := int64(s.logblocks) * s.bs / bbSize
	buf := make([]byte, bbSize)
	bb := func(i int64) ([]byte, error) {
		return buf, f.readAt(buf, base+i*bbSize)
	}
	cycle := func(i int64) (uint32, error) {
		b, err := bb(i)
		if err != nil {
			return 0, err
		}
		if be32(b, 0) == logHeaderMagic {
			return be32(b, 4), nil
		}
		return be32(b, 0), nil
	}
	first, err := cycle(0)
	if err != nil {
		return false, err
	}
	last, err := cycle(n - 1)
	if err != nil {
		return false, err
	}
	// The head: the first block whose cycle is not the first block's
	// (the blocks before it were written in this pass of the ring).
	head := n
	if first != last {
		lo, hi := int64(0), n-1 // cycle(lo) == first, cycle(hi) != first
		for hi-lo > 1 {
			mid := lo + (hi-lo)/2
			c, err := cycle(mid)
			if err != nil {
				return false, err
			}
			if c == first {
				lo = mid
			} else {
				hi = mid
			}
		}
		head = hi
	}
	// The last record before the head.
	for back := int64(1); back <= min(n, maxLogScan); back++ {
		i := (head - back + n) % n
		b, err := bb(i)
		if err != nil {
			return false, err
		}
		if be32(b, 0) != logHeaderMagic {
			continue
		}
		hblks := int64(1)
		if be32(b, 8)&2 != 0 { // a v2 log: big records need more header blocks
			if sz := int64(be32(b, 320)); sz > logCycleSize {
				hblks = (sz + logCycleSize - 1) / logCycleSize
			}
		}
		dataLen, ops := int64(be32(b, 12)), be32(b, 40)
		if (i+hblks+(dataLen+bbSize-1)/bbSize)%n != head%n || ops != 1 {
			return false, nil
		}
		op, err := bb((i + hblks) % n)
		if err != nil {
			return false, err
		}
		return op[9]&logUnmountTrans != 0, nil
	}
	return false, errors.New("no log record found before the head")
}
