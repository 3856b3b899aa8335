// Package fat reads files out of a FAT12, FAT16 or FAT32 filesystem
// (EFI system partitions, USB sticks, camera cards, old Windows volumes)
// given as an io.ReaderAt over its partition's bytes, without root, a
// mount or a restore of the disk: the file-level restore of sauve (ls,
// get, find) reads snapshots through it, fetching only the chunks the
// files use.
//
// It reads the boot sector's BPB (every field checked), the file
// allocation table of 12, 16 or 32 bits (the active copy when FAT32
// mirroring is off), the fixed root directory of FAT12/16 and cluster
// chains, VFAT long names (checked against their short entry's checksum;
// the short name is used when they do not match, as Linux does) and
// short names with the lowercase flags Windows NT sets.
//
// FAT stores no owner, permissions or links, so the metadata is what
// Linux's vfat shows with the default mount options (uid=0, gid=0,
// umask 022): directories 0755, files 0644, 0444 when the read-only
// attribute is set; one link per file, two per directory (the kernel
// counts subdirectories, which would mean reading every directory a
// listing shows); directories have size 0. Times are stored in local
// time without a zone: they are read as UTC (as mounting with tz=UTC
// shows them): mtime is the write time (2 s resolution), atime the
// access date, ctime the creation time (10 ms resolution). A file's
// inode number is the position of its directory entry, a directory's
// is its first cluster, so that a directory reachable from itself (a
// damaged filesystem) shows the same number again.
//
// It is written here rather than taken from a library: the fat32
// package of github.com/diskfs/go-diskfs, the Go FAT reader at hand,
// reads neither FAT12 nor FAT16 (EFI system partitions below 512 MiB
// and most small media are FAT16), and a reader of snapshots must bound
// every chain and count of a damaged image.
//
// Every count and length read from the disk is bounded before it is
// used: a damaged or hostile image gives an error naming the file and
// what is wrong, never a panic, a hang or a huge allocation.
package fat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"sync"
)

// Options tune Open.
type Options struct {
	// Warn hears of what was read with less certainty; nil: silence.
	Warn func(string)
}

// Cluster counts that decide the FAT type (Microsoft's FAT
// specification): fewer than 4085 clusters is FAT12, fewer than 65525
// FAT16, more FAT32.
const (
	maxFAT12Clusters = 4084
	maxFAT16Clusters = 65524
	maxFAT32Clusters = 0x0FFFFFF5 - 2 // cluster numbers 2..0x0FFFFFF6
)

// FS is an open FAT filesystem. It is safe for concurrent use.
type FS struct {
	r    io.ReaderAt
	size int64
	warn func(string)

	bits        int   // 12, 16 or 32
	bps         int64 // bytes per sector
	clusterSize int64
	clusters    uint32 // data clusters, numbered 2..clusters+1
	fatStart    int64  // byte offset of the FAT in use
	fatBytes    int64
	rootStart   int64 // FAT12/16: byte offset and length of the root directory
	rootBytes   int64
	rootCluster uint32 // FAT32
	dataStart   int64
	label       string

	mu    sync.Mutex
	pages map[int64][]byte          // pages of the FAT
	dirs  map[uint32]map[string]int // names (folded) of recently searched directories, to entry indexes
	ents  map[uint32][]entry        // entries of those directories
}

// Open reads the FAT filesystem of the size bytes of r.
func Open(r io.ReaderAt, size int64, opts Options) (*FS, error) {
	f := &FS{r: r, size: size, warn: opts.Warn, pages: map[int64][]byte{},
		dirs: map[uint32]map[string]int{}, ents: map[uint32][]entry{}}
	if f.warn == nil {
		f.warn = func(string) {}
	}
	bs := make([]byte, 512)
	if err := f.readAt(bs, 0); err != nil {
		return nil, fmt.Errorf("fat boot sector: %w", err)
	}
	bpbLabel, err := f.parseBPB(bs)
	if err != nil {
		return nil, err
	}
	f.label = bpbLabel
	// The label Windows and blkid show is the root directory's volume
	// entry; the boot sector's copy is often stale.
	if l, ok := f.rootLabel(); ok {
		f.label = l
	}
	return f, nil
}

// Probe says whether the first sector of r is the boot sector of a FAT
// filesystem this package reads: the 0x55AA signature and a sane BPB
// (NTFS and exFAT, whose boot sectors also end in 0x55AA, do not pass).
func Probe(r io.ReaderAt) bool {
	f := &FS{r: r, size: math.MaxInt64, warn: func(string) {}}
	bs := make([]byte, 512)
	if err := f.readAt(bs, 0); err != nil {
		return false
	}
	_, err := f.parseBPB(bs)
	return err == nil
}

// Label is the filesystem's volume label.
func (f *FS) Label() string { return f.label }

// Bits is the width of the filesystem's FAT entries: 12, 16 or 32.
func (f *FS) Bits() int { return f.bits }

func le16(b []byte, off int) uint16 { return binary.LittleEndian.Uint16(b[off:]) }
func le32(b []byte, off int) uint32 { return binary.LittleEndian.Uint32(b[off:]) }

func isPow2(v int64) bool { return v > 0 && v&(v-1) == 0 }

// parseBPB checks and keeps the geometry of boot sector bs; it returns
// the label the boot sector holds.
func (f *FS) parseBPB(bs []byte) (string, error) {
	switch {
	case le16(bs, 510) != 0xAA55:
		return "", errors.New("fat boot sector: no 0x55AA signature")
	case string(bs[3:11]) == "NTFS    ":
		return "", errors.New("fat boot sector: this is NTFS")
	case string(bs[3:11]) == "EXFAT   ":
		return "", errors.New("fat boot sector: this is exFAT, not FAT12/16/32")
	}
	bps := int64(le16(bs, 11))
	spc := int64(bs[13])
	reserved := int64(le16(bs, 14))
	nfats := int64(bs[16])
	rootEntries := int64(le16(bs, 17))
	total := int64(le16(bs, 19))
	if total == 0 {
		total = int64(le32(bs, 32))
	}
	media := bs[21]
	fatSectors := int64(le16(bs, 22))
	fat32 := fatSectors == 0
	if fat32 {
		fatSectors = int64(le32(bs, 36))
	}
	switch {
	case bps < 512 || bps > 4096 || !isPow2(bps):
		return "", fmt.Errorf("fat boot sector damaged: %d bytes per sector", bps)
	case !isPow2(spc):
		return "", fmt.Errorf("fat boot sector damaged: %d sectors per cluster", spc)
	case reserved == 0:
		return "", errors.New("fat boot sector damaged: no reserved sector")
	case nfats == 0:
		return "", errors.New("fat boot sector damaged: no FAT")
	case media != 0xF0 && media < 0xF8:
		return "", fmt.Errorf("fat boot sector damaged: media byte %#x", media)
	case fatSectors == 0:
		return "", errors.New("fat boot sector damaged: FATs of 0 sectors")
	case fat32 && rootEntries != 0:
		return "", fmt.Errorf("fat boot sector damaged: a FAT32 layout with %d root directory entries", rootEntries)
	case !fat32 && rootEntries == 0:
		return "", errors.New("fat boot sector damaged: a FAT12/16 layout without root directory entries")
	case total > f.size/bps:
		return "", fmt.Errorf("fat: the filesystem (%d sectors of %d bytes) is larger than its partition (%d bytes): truncated image?", total, bps, f.size)
	}
	rootSectors := (rootEntries*32 + bps - 1) / bps
	dataSector := reserved + nfats*fatSectors + rootSectors
	if dataSector >= total {
		return "", fmt.Errorf("fat boot sector damaged: the data area starts at sector %d of %d", dataSector, total)
	}
	clusters := (total - dataSector) / spc
	f.bps, f.clusterSize = bps, bps*spc
	f.fatBytes = fatSectors * bps
	f.fatStart = reserved * bps
	f.rootStart, f.rootBytes = (reserved+nfats*fatSectors)*bps, rootEntries*32
	f.dataStart = dataSector * bps
	labelAt := 43
	switch {
	case fat32:
		// Linux reads a FAT32 layout as FAT32 whatever its cluster
		// count; so does this reader, but says so.
		if clusters <= maxFAT16Clusters {
			f.warn(fmt.Sprintf("fat: a FAT32 layout with only %d clusters (the specification wants %d or more): read as FAT32, as Linux does", clusters, maxFAT16Clusters+1))
		}
		if v := le16(bs, 42); v != 0 {
			return "", fmt.Errorf("fat: FAT32 version %#x is not supported", v)
		}
		f.bits, labelAt = 32, 71
		if ext := le16(bs, 40); ext&0x80 != 0 { // mirroring off: one active FAT
			active := int64(ext & 0xF)
			if active >= nfats {
				return "", fmt.Errorf("fat boot sector damaged: active FAT %d of %d", active, nfats)
			}
			f.fatStart += active * f.fatBytes
		}
	case clusters <= maxFAT12Clusters:
		f.bits = 12
	case clusters <= maxFAT16Clusters:
		f.bits = 16
	default:
		return "", fmt.Errorf("fat boot sector damaged: %d clusters is too many for FAT16 (a FAT32 filesystem would have no root directory entries)", clusters)
	}
	// Clusters the FAT has no entry for do not exist (Linux's rule).
	if entries := f.fatBytes * 8 / int64(f.bits); clusters > entries-2 {
		clusters = entries - 2
	}
	if f.bits == 32 && clusters > maxFAT32Clusters {
		clusters = maxFAT32Clusters
	}
	if clusters < 1 {
		return "", errors.New("fat boot sector damaged: no data cluster")
	}
	f.clusters = uint32(clusters)
	if f.bits == 32 {
		f.rootCluster = le32(bs, 44)
		if !f.validCluster(f.rootCluster) {
			return "", fmt.Errorf("fat boot sector damaged: root directory cluster %d (clusters are 2 to %d)", f.rootCluster, f.clusters+1)
		}
	}
	label := ""
	if bs[labelAt-5] == 0x29 { // extended boot signature: serial, label, type follow
		label = strings.TrimRight(string(bs[labelAt:labelAt+11]), " ")
		if label == "NO NAME" {
			label = ""
		}
		label = shortChars([]byte(label))
	}
	return label, nil
}

// validCluster says whether c numbers a data cluster.
func (f *FS) validCluster(c uint32) bool { return c >= 2 && c-2 < f.clusters }

// clusterOffset is the byte offset of data cluster c.
func (f *FS) clusterOffset(c uint32) int64 { return f.dataStart + int64(c-2)*f.clusterSize }

// readAt reads len(p) bytes at off of the partition.
func (f *FS) readAt(p []byte, off int64) error {
	if off < 0 || off > f.size || int64(len(p)) > f.size-off {
		return fmt.Errorf("read of %d bytes at %d lies outside the filesystem (%d bytes)", len(p), off, f.size)
	}
	n, err := f.r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read at %d: %w", off, err)
}
