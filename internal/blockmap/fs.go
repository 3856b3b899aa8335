package blockmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"

	"github.com/sauve-backup/sauve/internal/extent"
)

// Filesystem is a filesystem found at the start of a region of a disk.
type Filesystem struct {
	Type  string // ext2, ext3, ext4, xfs, ntfs, fat12, fat16, fat32, swap, or the name of one sauve cannot map
	Label string
	UUID  string
	// Size is how many bytes from the region's start the filesystem
	// spans; bytes after it (up to the end of the partition) are imaged.
	Size      int64
	BlockSize int
	// Full, when not empty, says why the filesystem's free space is not
	// skipped: the region is imaged in full.
	Full string
	// m maps the used blocks, with offsets relative to the filesystem's
	// start. It is nil when Full is set.
	m extent.Map
}

// probe is one filesystem reader. It returns nil and no error when the
// region does not hold its filesystem, a Filesystem with Full set when it
// does but the filesystem cannot be trusted, and an error only for I/O
// errors. warn reports problems found later, while the map is read.
type probe func(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error)

var probes = []probe{probeExt, probeXFS, probeNTFS, probeFAT, probeSwap, probeOther}

// Probe identifies the filesystem in a region of size bytes read through
// r (offsets relative to the region) and returns its map of used blocks.
// It returns nil when no filesystem is recognised. Two filesystems' signatures in
// one region (a leftover of an earlier format) make it ambiguous: it is then imaged in full.
func Probe(r io.ReaderAt, size int64, warn func(string)) (*Filesystem, error) {
	var found []*Filesystem
	for _, p := range probes {
		fs, err := p(r, size, warn)
		if err != nil {
			return nil, err
		}
		if fs != nil {
			found = append(found, fs)
		}
	}
	switch len(found) {
	case 0:
		return nil, nil
	case 1:
		fs := found[0]
		if fs.Full != "" {
			fs.m = nil
		}
		if fs.Size <= 0 || fs.Size > size {
			fs.Size = size
		}
		return fs, nil
	}
	var names []string
	for _, fs := range found {
		names = append(names, fs.Type)
	}
	return &Filesystem{Type: strings.Join(names, "+"), Size: size,
		Full: "signatures of " + strings.Join(names, " and ") + " were both found (a leftover of an earlier format?): which one is current is unknown"}, nil
}

// readAt reads exactly len(b) bytes at off; reading past the end of the
// region is errShort.
func readAt(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return errShort
	}
	return fmt.Errorf("read at byte %d: %w", off, err)
}

var errShort = errors.New("structure runs past the end of its region")

// read returns n bytes at off, or nil and no error when they lie past
// the end of the region.
func read(r io.ReaderAt, off int64, n int) ([]byte, error) {
	b := make([]byte, n)
	if err := readAt(r, b, off); err != nil {
		if errors.Is(err, errShort) {
			return nil, nil
		}
		return nil, err
	}
	return b, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is the CRC32C update without the final inversion, as Linux's
// crc32c() computes it: ext4 stores such values.
func crc32c(seed uint32, p []byte) uint32 { return ^crc32.Update(^seed, castagnoli, p) }

var crc16Table = func() (t [256]uint16) {
	for i := range t {
		c := uint16(i)
		for range 8 {
			if c&1 != 0 {
				c = c>>1 ^ 0xA001
			} else {
				c >>= 1
			}
		}
		t[i] = c
	}
	return
}()

// crc16 is the CRC-16 (polynomial 0x8005, reflected) ext4's uninit_bg
// group descriptor checksums use.
func crc16(crc uint16, p []byte) uint16 {
	for _, b := range p {
		crc = crc>>8 ^ crc16Table[byte(crc)^b]
	}
	return crc
}

func le16(b []byte, off int) uint16 { return binary.LittleEndian.Uint16(b[off:]) }
func le32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }
func le64(b []byte, off int) uint64 { return binary.LittleEndian.Uint64(b[off:]) }
func be16(b []byte, off int) uint16 { return binary.BigEndian.Uint16(b[off:]) }
func be32(b []byte, off int) uint32 { return binary.BigEndian.Uint32(b[off:]) }
func be64(b []byte, off int) uint64 { return binary.BigEndian.Uint64(b[off:]) }

// uuidString formats 16 bytes as a UUID.
func uuidString(b []byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// cString returns b up to its first NUL, as valid UTF-8 without spaces at
// the end.
func cString(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		b = b[:i]
	}
	return strings.TrimRight(strings.ToValidUTF8(string(b), "?"), " ")
}
