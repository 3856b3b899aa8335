package ptable

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"unicode/utf16"
)

// maxEntryBytes bounds the entry array a header may claim (the usual
// array is 16 KiB): a damaged header must not cause a huge allocation.
const maxEntryBytes = 4 << 20

type gptHeader struct {
	myLBA, altLBA       uint64
	firstUse, lastUse   uint64
	diskGUID            string
	entryLBA            uint64
	nEntries, entrySize uint32
	entriesCRC          uint32
}

// readGPT reads the GPT of a disk with sectors of ss bytes. It returns nil
// when neither header is valid at this sector size.
func readGPT(r io.ReaderAt, size int64, ss int) (*Table, error) {
	last := uint64(size/int64(ss)) - 1
	if size/int64(ss) < 3 {
		return nil, nil
	}
	prim, perr := readHeader(r, size, ss, 1)
	var backLBA uint64 = last
	if prim != nil && prim.altLBA <= last && prim.altLBA > 1 {
		backLBA = prim.altLBA
	}
	back, berr := readHeader(r, size, ss, backLBA)
	if back == nil && backLBA != last {
		back, berr = readHeader(r, size, ss, last)
	}
	if prim == nil && back == nil {
		if perr == errIO || berr == errIO {
			return nil, fmt.Errorf("read GPT headers: %w", io.ErrUnexpectedEOF)
		}
		return nil, nil
	}
	t := &Table{Kind: GPT, SectorSize: ss}
	h := prim
	var entries []byte
	if prim != nil {
		var err error
		entries, err = readEntries(r, size, ss, prim)
		if err != nil {
			return nil, err
		}
		if entries == nil {
			t.Warnings = append(t.Warnings, "the primary GPT entry array fails its CRC check")
			h = nil
		}
	} else {
		t.Warnings = append(t.Warnings, "the primary GPT header is damaged ("+perr.Error()+"); using the backup")
	}
	if back == nil {
		t.Warnings = append(t.Warnings, "the backup GPT header is damaged or missing ("+berr.Error()+")")
	} else {
		bentries, err := readEntries(r, size, ss, back)
		if err != nil {
			return nil, err
		}
		switch {
		case bentries == nil:
			t.Warnings = append(t.Warnings, "the backup GPT entry array fails its CRC check")
		case h == nil:
			h, entries = back, bentries
		case !bytes.Equal(bentries, entries) || back.diskGUID != h.diskGUID:
			t.Warnings = append(t.Warnings, "the backup GPT differs from the primary; using the primary")
		}
	}
	if h == nil {
		return &Table{Kind: GPT, SectorSize: ss, Warnings: append(t.Warnings, "no valid GPT entry array")}, nil
	}
	t.ID = h.diskGUID
	// The partitions may only use [firstUse, lastUse]; the headers and
	// arrays lie outside that range.
	for i := uint32(0); i < h.nEntries; i++ {
		e := entries[int(i)*int(h.entrySize):]
		typ := e[:16]
		if allZero(typ) {
			continue
		}
		first, lastLBA := binary.LittleEndian.Uint64(e[32:]), binary.LittleEndian.Uint64(e[40:])
		p := Partition{
			Number: int(i) + 1, Type: guid(typ), UUID: guid(e[16:32]), Name: utf16Name(e[56:128]),
		}
		p.TypeName = gptTypeNames[p.Type]
		switch {
		case lastLBA < first:
			t.Warnings = append(t.Warnings, fmt.Sprintf("GPT entry %d ends (sector %d) before it starts (sector %d): ignored", i+1, lastLBA, first))
			continue
		case first > uint64(size)/uint64(ss):
			p.Start, p.Problem = size, "starts past the end of the disk"
		default:
			p.Start = int64(first) * int64(ss)
			n := lastLBA - first + 1
			if n > uint64(size)/uint64(ss) {
				n = uint64(size)/uint64(ss) + 1 // checkLayout clips and reports it
			}
			p.Size = int64(n) * int64(ss)
			// A header whose usable range runs past the disk (a copy onto a
			// smaller disk) is reported by checkLayout as running past the end.
			if first < h.firstUse || lastLBA > h.lastUse {
				p.Problem = fmt.Sprintf("lies outside the usable sectors %d-%d the GPT header declares", h.firstUse, h.lastUse)
			}
		}
		t.Partitions = append(t.Partitions, p)
	}
	checkLayout(t.Partitions, size)
	return t, nil
}

type headerError string

func (e headerError) Error() string { return string(e) }

const errIO = headerError("unreadable")

func readHeader(r io.ReaderAt, size int64, ss int, lba uint64) (*gptHeader, error) {
	b := make([]byte, ss)
	if int64(lba+1)*int64(ss) > size {
		return nil, headerError("beyond the end of the disk")
	}
	if err := readFull(r, b, int64(lba)*int64(ss)); err != nil {
		return nil, errIO
	}
	if string(b[:8]) != "EFI PART" {
		return nil, headerError("no EFI PART signature")
	}
	hsize := binary.LittleEndian.Uint32(b[12:])
	if hsize < 92 || int(hsize) > ss {
		return nil, headerError(fmt.Sprintf("header size %d", hsize))
	}
	want := binary.LittleEndian.Uint32(b[16:])
	hb := append([]byte(nil), b[:hsize]...)
	clear(hb[16:20])
	if crc32.ChecksumIEEE(hb) != want {
		return nil, headerError("header CRC mismatch")
	}
	h := &gptHeader{
		myLBA: binary.LittleEndian.Uint64(b[24:]), altLBA: binary.LittleEndian.Uint64(b[32:]),
		firstUse: binary.LittleEndian.Uint64(b[40:]), lastUse: binary.LittleEndian.Uint64(b[48:]),
		diskGUID: guid(b[56:72]), entryLBA: binary.LittleEndian.Uint64(b[72:]),
		nEntries: binary.LittleEndian.Uint32(b[80:]), entrySize: binary.LittleEndian.Uint32(b[84:]),
		entriesCRC: binary.LittleEndian.Uint32(b[88:]),
	}
	if h.myLBA != lba {
		return nil, headerError(fmt.Sprintf("header at sector %d says it is at sector %d", lba, h.myLBA))
	}
	if h.entrySize < 128 || h.entrySize&(h.entrySize-1) != 0 || uint64(h.nEntries)*uint64(h.entrySize) > maxEntryBytes {
		return nil, headerError(fmt.Sprintf("%d entries of %d bytes", h.nEntries, h.entrySize))
	}
	n := uint64(size / int64(ss))
	arr := (uint64(h.nEntries)*uint64(h.entrySize) + uint64(ss) - 1) / uint64(ss)
	if h.entryLBA < 2 || h.entryLBA+arr > n || h.firstUse > h.lastUse {
		return nil, headerError("entry array or usable range outside the disk")
	}
	return h, nil
}

// readEntries reads and checks a header's entry array; nil means a CRC
// mismatch.
func readEntries(r io.ReaderAt, size int64, ss int, h *gptHeader) ([]byte, error) {
	b := make([]byte, int(h.nEntries)*int(h.entrySize))
	if err := readFull(r, b, int64(h.entryLBA)*int64(ss)); err != nil {
		return nil, fmt.Errorf("read GPT entries at sector %d: %w", h.entryLBA, err)
	}
	if crc32.ChecksumIEEE(b) != h.entriesCRC {
		return nil, nil
	}
	return b, nil
}

// guid formats a GUID stored in the mixed-endian layout GPT uses.
func guid(b []byte) string {
	return fmt.Sprintf("%08X-%04X-%04X-%X-%X", binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint16(b[4:]),
		binary.LittleEndian.Uint16(b[6:]), b[8:10], b[10:16])
}

func utf16Name(b []byte) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return strings.ToValidUTF8(string(utf16.Decode(u)), "?")
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

var gptTypeNames = map[string]string{
	"C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
	"21686148-6449-6E6F-744E-656564454649": "BIOS boot",
	"0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
	"0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
	"E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
	"A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
	"4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
	"44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
	"B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM64)",
	"933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
	"BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
	"CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
	"EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
	"E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
	"DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
	"5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": "Windows LDM metadata",
	"AF9B60A0-1431-4F62-BC68-3311714A69AD": "Windows LDM data",
	"516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD data",
	"48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS+",
	"7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
}
