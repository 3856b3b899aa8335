package ntfs

import (
	"errors"
	"fmt"
	"unicode/utf16"
)

// Attribute types.
const (
	atStdInfo    = 0x10
	atAttrList   = 0x20
	atFileName   = 0x30
	atVolumeName = 0x60
	atVolumeInfo = 0x70
	atData       = 0x80
	atIndexRoot  = 0x90
	atIndexAlloc = 0xA0
	atReparse    = 0xC0
	atEnd        = 0xFFFFFFFF
)

// Attribute flags.
const (
	attrCompressed = 0x00FF
	attrEncrypted  = 0x4000
	attrSparse     = 0x8000
)

// Record flags.
const (
	recInUse = 0x1
	recDir   = 0x2
)

// volDirty is the flag of $VOLUME_INFORMATION set while the volume is
// mounted.
const volDirty = 0x1

// maxExtensionBytes bounds the extension records of one file kept in
// memory (a 256 KiB attribute list names at most ~10,000 of them).
const maxExtensionBytes = 64 << 20

// maxAttrList bounds an attribute list (Windows keeps them under 256 KiB).
const maxAttrList = 256 << 10

// refNum is the record number of a file reference (its low 48 bits; the
// top 16 are the record's sequence number).
func refNum(ref uint64) uint64 { return ref & (1<<48 - 1) }

// record is a file's MFT record with the attributes of its extension
// records.
type record struct {
	num   uint64
	seq   uint16
	links uint16
	flags uint16
	base  uint64 // base record of an extension record; 0 for a base record
	attrs []*attr
}

func (r *record) isDir() bool { return r.flags&recDir != 0 }

// attr is one attribute (one segment of it, for a non-resident attribute
// split over records by an attribute list).
type attr struct {
	typ      uint32
	name     string
	flags    uint16
	id       uint16
	resident bool
	value    []byte // resident value

	lowVCN, highVCN int64
	runs            []run
	compUnit        int // log2 of the clusters of a compression unit
	alloc, size     int64
	init            int64
}

// find returns the first attribute of type typ named name.
func (r *record) find(typ uint32, name string) *attr {
	for _, a := range r.attrs {
		if a.typ == typ && a.name == name {
			return a
		}
	}
	return nil
}

// all returns the attributes (segments) of type typ named name.
func (r *record) all(typ uint32, name string) []*attr {
	var out []*attr
	for _, a := range r.attrs {
		if a.typ == typ && a.name == name {
			out = append(out, a)
		}
	}
	return out
}

func utf16String(b []byte) string {
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = le16(b, 2*i)
	}
	return string(utf16.Decode(u))
}

// fixup checks and undoes the update sequence of a multi-sector
// structure (an MFT record or an INDX block): the last two bytes of each
// 512-byte block hold the sequence number, their real value is kept in
// the array. A mismatch means a torn or damaged write.
func fixup(b []byte) error {
	ofs, count := int(le16(b, 4)), int(le16(b, 6))
	if count != len(b)/fixupSector+1 || ofs < 8 || ofs%2 != 0 || ofs+2*count > fixupSector-2 {
		return fmt.Errorf("damaged update sequence array (offset %d, %d entries for %d bytes)", ofs, count, len(b))
	}
	for i := 1; i < count; i++ {
		end := i*fixupSector - 2
		if b[end] != b[ofs] || b[end+1] != b[ofs+1] {
			return fmt.Errorf("update sequence mismatch in sector %d (torn write or damage)", i-1)
		}
		b[end], b[end+1] = b[ofs+2*i], b[ofs+2*i+1]
	}
	return nil
}

// readRecord reads and parses record num through the $MFT stream.
func (f *FS) readRecord(num uint64) (*record, error) {
	if num >= uint64(f.mft.size/f.recSize) {
		return nil, fmt.Errorf("MFT record %d lies outside the MFT (%d records)", num, f.mft.size/f.recSize)
	}
	raw := make([]byte, f.recSize)
	if err := f.mft.readFull(raw, int64(num)*f.recSize); err != nil {
		return nil, fmt.Errorf("MFT record %d: %w", num, err)
	}
	return f.parseRecord(num, raw)
}

// record returns base record num with the attributes of its extension
// records.
func (f *FS) record(num uint64) (*record, error) {
	f.mu.Lock()
	r, ok := f.recs[num]
	f.mu.Unlock()
	if ok {
		return r, nil
	}
	r, err := f.readRecord(num)
	if err != nil {
		return nil, err
	}
	if r.base != 0 {
		return nil, fmt.Errorf("MFT record %d is an extension of record %d, not a file", num, refNum(r.base))
	}
	if r.find(atAttrList, "") != nil {
		if err := f.loadExtensions(r); err != nil {
			return nil, err
		}
	}
	f.mu.Lock()
	if len(f.recs) >= 256 {
		clear(f.recs)
	}
	f.recs[num] = r
	f.mu.Unlock()
	return r, nil
}

func (f *FS) parseRecord(num uint64, b []byte) (*record, error) {
	switch string(b[:4]) {
	case "FILE":
	case "BAAD":
		return nil, fmt.Errorf("MFT record %d is marked bad", num)
	default:
		return nil, fmt.Errorf("MFT record %d: no FILE signature (damaged)", num)
	}
	if err := fixup(b); err != nil {
		return nil, fmt.Errorf("MFT record %d: %w", num, err)
	}
	r := &record{num: num, seq: le16(b, 0x10), links: le16(b, 0x12), flags: le16(b, 0x16), base: le64(b, 0x20)}
	if r.flags&recInUse == 0 {
		return nil, fmt.Errorf("MFT record %d is not in use (a deleted file)", num)
	}
	if le16(b, 4) >= 0x30 && uint64(le32(b, 0x2C)) != num&0xFFFFFFFF {
		return nil, fmt.Errorf("MFT record %d says it is record %d (damaged)", num, le32(b, 0x2C))
	}
	used := int(le32(b, 0x18))
	off := int(le16(b, 0x14))
	if used > len(b) || used < 0 || off < 0x2A || off%8 != 0 || off+4 > used {
		return nil, fmt.Errorf("MFT record %d: damaged header (attributes at %d, %d bytes used)", num, off, used)
	}
	for {
		if off+4 > used {
			return nil, fmt.Errorf("MFT record %d: attributes run past the record's end", num)
		}
		if le32(b, off) == atEnd {
			return r, nil
		}
		if off+16 > used {
			return nil, fmt.Errorf("MFT record %d: attribute at %d runs past the record's end", num, off)
		}
		n := int(le32(b, off+4))
		if n < 24 || n%8 != 0 || n > used-off {
			return nil, fmt.Errorf("MFT record %d: attribute at %d has a damaged length %d", num, off, n)
		}
		a, err := f.parseAttr(b[off : off+n])
		if err != nil {
			return nil, fmt.Errorf("MFT record %d, attribute %#x at %d: %w", num, le32(b, off), off, err)
		}
		r.attrs = append(r.attrs, a)
		off += n
	}
}

// maxSize bounds every size an attribute claims (NTFS's own limit is
// 2^64 - 1 bytes, but nothing real comes near 2^60).
const maxSize = 1 << 60

func (f *FS) parseAttr(b []byte) (*attr, error) {
	a := &attr{typ: le32(b, 0), flags: le16(b, 0x0C), id: le16(b, 0x0E), resident: b[8] == 0}
	if nl, no := int(b[9]), int(le16(b, 0x0A)); nl > 0 {
		if no+2*nl > len(b) {
			return nil, errors.New("name lies past the attribute's end")
		}
		a.name = utf16String(b[no : no+2*nl])
	}
	if a.resident {
		vl, vo := int64(le32(b, 0x10)), int64(le16(b, 0x14))
		if vo+vl > int64(len(b)) {
			return nil, fmt.Errorf("resident value of %d bytes at %d lies past the attribute's end (%d bytes)", vl, vo, len(b))
		}
		a.value = b[vo : vo+vl]
		a.size, a.init, a.alloc = vl, vl, vl
		return a, nil
	}
	if len(b) < 0x40 {
		return nil, errors.New("non-resident attribute header too short")
	}
	a.lowVCN, a.highVCN = int64(le64(b, 0x10)), int64(le64(b, 0x18))
	a.compUnit = int(b[0x22])
	a.alloc, a.size, a.init = int64(le64(b, 0x28)), int64(le64(b, 0x30)), int64(le64(b, 0x38))
	if a.lowVCN < 0 || a.lowVCN > maxSize/f.cs || a.highVCN < a.lowVCN-1 || a.highVCN >= maxSize/f.cs {
		return nil, fmt.Errorf("damaged VCN range %d-%d", a.lowVCN, a.highVCN)
	}
	if a.lowVCN == 0 && (a.alloc < 0 || a.size < 0 || a.init < 0 || a.alloc > maxSize || a.size > a.alloc || a.init > a.size) {
		return nil, fmt.Errorf("damaged sizes (allocated %d, data %d, initialized %d)", a.alloc, a.size, a.init)
	}
	mp := int(le16(b, 0x20))
	if mp < 0x40 || mp > len(b) {
		return nil, fmt.Errorf("runlist at %d lies outside the attribute", mp)
	}
	var err error
	a.runs, err = decodeRuns(b[mp:], a.lowVCN, a.highVCN, f.clusters)
	return a, err
}

// run maps n clusters from vcn on to lcn, or to nothing (a hole) when lcn
// is negative.
type run struct {
	vcn, lcn, n int64
}

// decodeRuns decodes a runlist: each run is a header byte (the byte
// counts of a length and of a signed LCN delta), the length, the delta;
// a run without a delta is sparse. The runs must cover low to high.
func decodeRuns(b []byte, low, high, clusters int64) ([]run, error) {
	var out []run
	vcn, lcn := low, int64(0)
	for i := 0; i < len(b) && b[i] != 0; {
		nl, ol := int(b[i]&0xF), int(b[i]>>4)
		i++
		if nl == 0 || nl > 8 || ol > 8 || i+nl+ol > len(b) {
			return nil, fmt.Errorf("damaged runlist header at byte %d", i-1)
		}
		var n int64
		for k := nl - 1; k >= 0; k-- {
			n = n<<8 | int64(b[i+k])
		}
		i += nl
		if n <= 0 || n > high+1-vcn {
			return nil, fmt.Errorf("run of %d clusters at VCN %d runs past the attribute's last VCN %d", n, vcn, high)
		}
		r := run{vcn: vcn, lcn: -1, n: n}
		if ol > 0 {
			d := int64(int8(b[i+ol-1])) // sign-extended top byte
			for k := ol - 2; k >= 0; k-- {
				d = d<<8 | int64(b[i+k])
			}
			i += ol
			lcn += d
			if lcn < 0 || lcn >= clusters || n > clusters-lcn {
				return nil, fmt.Errorf("run of %d clusters at cluster %d lies outside the volume (%d clusters)", n, lcn, clusters)
			}
			r.lcn = lcn
		}
		out = append(out, r)
		vcn += n
	}
	if vcn != high+1 {
		return nil, fmt.Errorf("runlist covers VCNs %d-%d, the attribute %d-%d", low, vcn-1, low, high)
	}
	return out, nil
}

// loadExtensions adds to base record r the attributes of the extension
// records its attribute list names.
func (f *FS) loadExtensions(r *record) error {
	al := r.find(atAttrList, "")
	var list []byte
	if al.resident {
		list = al.value
	} else {
		if al.size > maxAttrList {
			return fmt.Errorf("MFT record %d: attribute list of %d bytes (damaged?)", r.num, al.size)
		}
		s, err := f.newStream(r.num, []*attr{al})
		if err != nil {
			return fmt.Errorf("MFT record %d, attribute list: %w", r.num, err)
		}
		list = make([]byte, al.size)
		if err := s.readFull(list, 0); err != nil {
			return fmt.Errorf("MFT record %d, attribute list: %w", r.num, err)
		}
	}
	seen := map[uint64]bool{r.num: true}
	for off := 0; off+0x1A <= len(list); {
		n := int(le16(list, off+4))
		if n < 0x1A || n > len(list)-off {
			return fmt.Errorf("MFT record %d: damaged attribute list entry at %d", r.num, off)
		}
		ext := refNum(le64(list, off+0x10))
		off += n
		if seen[ext] {
			continue
		}
		seen[ext] = true
		if int64(len(seen))*f.recSize > maxExtensionBytes {
			return fmt.Errorf("MFT record %d: more than %d extension records (damaged attribute list?)", r.num, maxExtensionBytes/f.recSize)
		}
		x, err := f.readRecord(ext)
		if err != nil {
			return fmt.Errorf("MFT record %d's extension: %w", r.num, err)
		}
		if refNum(x.base) != r.num {
			return fmt.Errorf("MFT record %d names record %d as its extension, which belongs to record %d", r.num, ext, refNum(x.base))
		}
		for _, a := range x.attrs {
			if a.typ != atAttrList {
				r.attrs = append(r.attrs, a)
			}
		}
	}
	return nil
}
