package ptable

import (
	"encoding/binary"
	"fmt"
	"io"
)

// maxLogical bounds the EBR chain: a loop or a huge chain in a damaged
// table must not keep the reader busy.
const maxLogical = 256

type mbrEntry struct {
	status byte
	typ    byte
	lba    uint32
	count  uint32
}

func mbrEntries(sector []byte) [4]mbrEntry {
	var out [4]mbrEntry
	for i := range out {
		e := sector[446+16*i:]
		out[i] = mbrEntry{status: e[0], typ: e[4], lba: binary.LittleEndian.Uint32(e[8:]), count: binary.LittleEndian.Uint32(e[12:])}
	}
	return out
}

func hasProtective(sector []byte) bool {
	for _, e := range mbrEntries(sector) {
		if e.typ == 0xEE {
			return true
		}
	}
	return false
}

func isExtended(t byte) bool { return t == 0x05 || t == 0x0F || t == 0x85 }

// readMBR reads a DOS partition table. A sector whose entries are not
// plausible (status bytes other than 0x00 and 0x80, or no entry at all) is
// not a partition table: filesystem boot sectors end in 0x55AA too.
func readMBR(r io.ReaderAt, size int64, ss int, sector []byte) (*Table, error) {
	entries := mbrEntries(sector)
	n := 0
	for _, e := range entries {
		if e.status != 0 && e.status != 0x80 {
			return nil, nil
		}
		if e.typ != 0 && e.count != 0 {
			n++
			if e.lba == 0 {
				return nil, nil // would hold the MBR itself
			}
		}
	}
	if n == 0 {
		return nil, nil
	}
	t := &Table{Kind: MBR, SectorSize: ss, ID: fmt.Sprintf("%08x", binary.LittleEndian.Uint32(sector[440:]))}
	var ext *Partition
	for i, e := range entries {
		if e.typ == 0 || e.count == 0 {
			continue
		}
		p := Partition{
			Number: i + 1, Start: int64(e.lba) * int64(ss), Size: int64(e.count) * int64(ss),
			Type: fmt.Sprintf("0x%02x", e.typ), TypeName: mbrTypeName(e.typ), Bootable: e.status == 0x80,
			Container: isExtended(e.typ),
		}
		t.Partitions = append(t.Partitions, p)
		if p.Container {
			if ext != nil {
				t.Warnings = append(t.Warnings, fmt.Sprintf("partition %d is a second extended partition: its logical partitions are not read", i+1))
				continue
			}
			ext = &t.Partitions[len(t.Partitions)-1]
		}
	}
	var logical []Partition
	if ext != nil {
		var err error
		logical, err = readEBRs(r, size, ss, ext, t)
		if err != nil {
			return nil, err
		}
	}
	t.Partitions = append(t.Partitions, logical...)
	checkLayout(t.Partitions, size)
	return t, nil
}

// readEBRs walks the chain of extended boot records. Logical partition
// starts are relative to their EBR, next-EBR links to the extended
// partition's start.
func readEBRs(r io.ReaderAt, size int64, ss int, ext *Partition, t *Table) ([]Partition, error) {
	var out []Partition
	base := ext.Start / int64(ss)
	extEnd := ext.Start + ext.Size
	seen := map[int64]bool{}
	sector := make([]byte, 512)
	ebr := base
	warn := func(format string, args ...any) {
		t.Warnings = append(t.Warnings, fmt.Sprintf(format, args...))
	}
	for num := 5; ; num++ {
		off := ebr * int64(ss)
		if seen[ebr] {
			warn("the chain of logical partitions loops back to sector %d: stopped there", ebr)
			break
		}
		if len(seen) >= maxLogical {
			warn("more than %d logical partitions: the rest are not read", maxLogical)
			break
		}
		seen[ebr] = true
		if off+512 > size || off < ext.Start || off >= extEnd {
			warn("extended boot record at sector %d lies outside the extended partition or the disk", ebr)
			break
		}
		if err := readFull(r, sector, off); err != nil {
			return nil, fmt.Errorf("read extended boot record at byte %d: %w", off, err)
		}
		if sector[510] != 0x55 || sector[511] != 0xAA {
			if num > 5 {
				warn("extended boot record at sector %d has no 0x55AA signature: the chain stops there", ebr)
			}
			break
		}
		es := mbrEntries(sector)
		if l := es[0]; l.typ != 0 && l.count != 0 {
			p := Partition{
				Number: num, Start: (ebr + int64(l.lba)) * int64(ss), Size: int64(l.count) * int64(ss),
				Type: fmt.Sprintf("0x%02x", l.typ), TypeName: mbrTypeName(l.typ), Bootable: l.status == 0x80,
			}
			if l.lba == 0 || p.Start < ext.Start || p.End() > extEnd {
				p.Problem = "lies outside its extended partition"
			}
			out = append(out, p)
		} else {
			num--
		}
		next := es[1]
		if !isExtended(next.typ) || next.count == 0 {
			break
		}
		ebr = base + int64(next.lba)
	}
	return out, nil
}

func mbrTypeName(t byte) string {
	switch t {
	case 0x01:
		return "FAT12"
	case 0x04, 0x06, 0x0e:
		return "FAT16"
	case 0x05:
		return "Extended"
	case 0x07:
		return "HPFS/NTFS/exFAT"
	case 0x0b, 0x0c:
		return "W95 FAT32"
	case 0x0f:
		return "W95 Extended (LBA)"
	case 0x17:
		return "Hidden HPFS/NTFS"
	case 0x27:
		return "Hidden NTFS WinRE"
	case 0x82:
		return "Linux swap"
	case 0x83:
		return "Linux"
	case 0x85:
		return "Linux extended"
	case 0x8e:
		return "Linux LVM"
	case 0xa5:
		return "FreeBSD"
	case 0xee:
		return "GPT protective"
	case 0xef:
		return "EFI (FAT)"
	case 0xfd:
		return "Linux raid autodetect"
	}
	return ""
}
