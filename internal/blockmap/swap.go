package blockmap

import (
	"fmt"
	"io"
	"strings"

	"github.com/sauve-backup/sauve/internal/extent"
)

// Linux swap holds nothing worth keeping across a restore except its
// header page (signature, UUID, label), unless it holds a hibernation
// image, which is imaged in full.

var swapSuspend = []string{"S1SUSPEND", "S2SUSPEND", "ULSUSPEND", "LINHIB0001", "\xed\xc3\x02\xe9\x98\x56\xe5\x0c"}

func probeSwap(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	for _, ps := range []int64{4096, 8192, 16384, 65536} {
		if ps > size {
			break
		}
		b, err := read(r, 0, int(ps))
		if err != nil || b == nil {
			return nil, err
		}
		sig := string(b[ps-10:])
		for _, s := range swapSuspend {
			if strings.HasPrefix(sig, s) {
				return &Filesystem{Type: "swap", Size: size, Full: "it holds a hibernation image"}, nil
			}
		}
		if sig != "SWAPSPACE2" {
			continue
		}
		fs := &Filesystem{Type: "swap", BlockSize: int(ps), Label: cString(b[1052:1068]), UUID: uuidString(b[1036:1052])}
		version, last := le32(b, 1024), int64(le32(b, 1028))
		if version != 1 {
			version, last = be32(b, 1024), int64(be32(b, 1028))
		}
		switch {
		case version != 1:
			fs.Full = fmt.Sprintf("unknown swap version %d", version)
		case last < 1 || (last+1) > size/ps:
			fs.Full = fmt.Sprintf("its header claims %d pages, more than its partition holds", last+1)
		}
		if fs.Full != "" {
			return fs, nil
		}
		fs.Size = (last + 1) * ps
		fs.m = swapMap(ps)
		return fs, nil
	}
	return nil, nil
}

// swapMap maps only the header page.
type swapMap int64

func (s swapMap) Data(off, n int64) ([]extent.Range, error) {
	if off >= int64(s) {
		return nil, nil
	}
	return []extent.Range{{Start: off, End: min(off+n, int64(s))}}, nil
}

// others are signatures of formats sauve has no free-space map for:
// found, they are named in the warning and imaged in full.
var others = []struct {
	name  string
	off   int64
	magic string
}{
	{"btrfs", 0x10040, "_BHRfS_M"},
	{"LUKS", 0, "LUKS\xba\xbe"},
	{"LUKS2", 0, "SKUL\xba\xbe"},
	{"LVM2 physical volume", 536, "LVM2 001"},
	{"exFAT", 3, "EXFAT   "},
	{"ReFS", 3, "ReFS\x00\x00\x00\x00"},
	{"BitLocker", 3, "-FVE-FS-"},
	{"f2fs", 1024, "\x10\x20\xf5\xf2"},
	{"squashfs", 0, "hsqs"},
	{"ISO 9660", 0x8001, "CD001"},
	{"Linux RAID (md 1.1)", 0, "\xfc\x4e\x2b\xa9"},
	{"Linux RAID (md 1.2)", 4096, "\xfc\x4e\x2b\xa9"},
	{"HFS+", 1024, "H+"},
	{"bcachefs", 4096 + 24, "\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81"},
}

func probeOther(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	for _, o := range others {
		b, err := read(r, o.off, len(o.magic))
		if err != nil {
			return nil, err
		}
		if b != nil && string(b) == o.magic {
			return &Filesystem{Type: o.name, Size: size, Full: "sauve has no free-space map for " + o.name}, nil
		}
	}
	return nil, nil
}
