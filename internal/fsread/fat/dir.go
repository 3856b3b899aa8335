package fat

import (
	"fmt"
	"strings"
	"time"
	"unicode/utf16"
)

// Attribute bits of a directory entry.
const (
	attrReadOnly = 0x01
	attrVolume   = 0x08
	attrDir      = 0x10
	attrLFN      = 0x0F // read-only, hidden, system and volume: a long name slot
)

// maxDirEntries is the most entries a directory holds (the
// specification's limit: 2 MiB of entries).
const maxDirEntries = 65536

// rootDirCluster stands for the root directory in the names of the
// directory caches (cluster 0 is what ".." holds for the root).
const rootDirCluster = 0

// entry is a name in a directory, from its short entry.
type entry struct {
	name    string
	short   string // the 8.3 name, also looked up
	pos     int64  // byte offset of the short entry in the partition
	attr    byte
	cluster uint32
	size    uint32
	raw     [32]byte
}

func (e *entry) isDir() bool { return e.attr&attrDir != 0 }

// dirBytes reads the directory whose first cluster is c (rootDirCluster
// for the root), and the partition offset of each of its clusters.
func (f *FS) dirBytes(c uint32) ([]byte, []int64, error) {
	if c == rootDirCluster && f.bits != 32 {
		b := make([]byte, f.rootBytes)
		if err := f.readAt(b, f.rootStart); err != nil {
			return nil, nil, fmt.Errorf("root directory: %w", err)
		}
		return b, []int64{f.rootStart}, nil
	}
	if c == rootDirCluster {
		c = f.rootCluster
	}
	limit := max(1, maxDirEntries*32/f.clusterSize)
	rs, err := f.chain(c, limit+1)
	if err != nil {
		return nil, nil, fmt.Errorf("directory at cluster %d: %w", c, err)
	}
	var n int64
	for _, r := range rs {
		n += int64(r.n)
	}
	if n > limit {
		return nil, nil, fmt.Errorf("directory at cluster %d: more than %d entries (damaged FAT?)", c, maxDirEntries)
	}
	b := make([]byte, 0, n*f.clusterSize)
	var at []int64
	for _, r := range rs {
		for i := range r.n {
			off := f.clusterOffset(r.first + i)
			p := make([]byte, f.clusterSize)
			if err := f.readAt(p, off); err != nil {
				return nil, nil, fmt.Errorf("directory at cluster %d: %w", c, err)
			}
			b = append(b, p...)
			at = append(at, off)
		}
	}
	return b, at, nil
}

// readDir lists the directory whose first cluster is c, but "." and
// "..", volume labels, deleted entries and damaged names.
func (f *FS) readDir(c uint32) ([]entry, error) {
	f.mu.Lock()
	es, ok := f.ents[c]
	f.mu.Unlock()
	if ok {
		return es, nil
	}
	b, at, err := f.dirBytes(c)
	if err != nil {
		return nil, err
	}
	per := int64(len(b))
	if len(at) > 1 {
		per = f.clusterSize
	}
	var lfn longName
	for i := 0; i+32 <= len(b); i += 32 {
		d := b[i : i+32]
		switch {
		case d[0] == 0: // the end of the directory
			i = len(b)
			continue
		case d[0] == 0xE5:
			lfn.reset()
			continue
		case d[11]&0x3F == attrLFN:
			lfn.add(d)
			continue
		case d[11]&attrVolume != 0:
			lfn.reset()
			continue
		}
		e := entry{attr: d[11], cluster: uint32(le16(d, 26)), size: le32(d, 28)}
		e.pos = at[int64(i)/per] + int64(i)%per
		copy(e.raw[:], d)
		if f.bits == 32 {
			e.cluster |= uint32(le16(d, 20)) << 16
		}
		e.short = shortName(d)
		e.name = e.short
		if n, ok := lfn.name(checksum(d[:11])); ok && goodName(n) && n != "." && n != ".." {
			e.name = n
		} else if ok {
			f.warn(fmt.Sprintf("fat: the long name %q of %q cannot name a file: the short name is used", n, e.short))
		} else if lfn.slots > 0 {
			f.warn(fmt.Sprintf("fat: a long name before %q does not match it (a short-name-only tool changed the entry?): the short name is used", e.short))
		}
		lfn.reset()
		if e.name == "." || e.name == ".." {
			continue
		}
		if !goodName(e.name) {
			f.warn(fmt.Sprintf("fat: directory entry at byte %d has a damaged name %q: skipped", e.pos, e.name))
			continue
		}
		es = append(es, e)
	}
	f.mu.Lock()
	if len(f.ents) >= 16 {
		clear(f.ents)
		clear(f.dirs)
	}
	f.ents[c] = es
	f.mu.Unlock()
	return es, nil
}

// goodName says whether a name read from an entry can name a file.
func goodName(s string) bool {
	return s != "" && !strings.ContainsAny(s, "/\x00")
}

// longName gathers the VFAT long name slots that precede a short entry:
// they come last part first, numbered down to 1, each with the checksum
// of the short name they belong to.
type longName struct {
	slots int // slots of the name being read; 0: none
	want  int // the number the next slot must carry
	sum   byte
	units [20 * 13]uint16
}

func (l *longName) reset() { l.slots, l.want = 0, 0 }

func (l *longName) add(d []byte) {
	ord := int(d[0] & 0x1F)
	if d[0]&0x40 != 0 { // the last part of the name, stored first
		if ord == 0 || ord > 20 {
			l.reset()
			l.slots = -1 // damaged: ignore until the short entry
			return
		}
		l.slots, l.want, l.sum = ord, ord, d[13]
	}
	if l.slots <= 0 || ord != l.want || d[13] != l.sum {
		l.slots = -1
		return
	}
	u := l.units[(ord-1)*13:]
	for i, off := range [13]int{1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30} {
		u[i] = le16(d, off)
	}
	l.want--
}

// name returns the gathered name if it is whole and belongs to the short
// entry of checksum sum.
func (l *longName) name(sum byte) (string, bool) {
	if l.slots <= 0 || l.want != 0 || l.sum != sum {
		return "", false
	}
	u := l.units[:l.slots*13]
	for i, c := range u {
		if c == 0 {
			u = u[:i]
			break
		}
	}
	if len(u) == 0 {
		return "", false
	}
	return string(utf16.Decode(u)), true
}

// checksum is the checksum of an 8.3 name that its long name slots hold.
func checksum(name []byte) byte {
	var s byte
	for _, c := range name {
		s = (s>>1 | s<<7) + c
	}
	return s
}

// NT's case flags, in byte 12 of a short entry: the base name or the
// extension is shown in lowercase.
const (
	lowerBase = 0x08
	lowerExt  = 0x10
)

// shortName is the name of short entry d, with NT's case flags applied.
func shortName(d []byte) string {
	base := []byte(strings.TrimRight(string(d[0:8]), " "))
	ext := []byte(strings.TrimRight(string(d[8:11]), " "))
	if len(base) > 0 && base[0] == 0x05 { // a first byte of 0xE5 (KANJI), escaped
		base[0] = 0xE5
	}
	if d[12]&lowerBase != 0 {
		base = asciiLower(base)
	}
	if d[12]&lowerExt != 0 {
		ext = asciiLower(ext)
	}
	s := shortChars(base)
	if len(ext) > 0 {
		s += "." + shortChars(ext)
	}
	return s
}

func asciiLower(b []byte) []byte {
	out := append([]byte(nil), b...)
	for i, c := range out {
		if 'A' <= c && c <= 'Z' {
			out[i] = c + 'a' - 'A'
		}
	}
	return out
}

// fold is a name as Linux's vfat compares names: ASCII letters without
// case.
func fold(s string) string { return string(asciiLower([]byte(s))) }

// cp437 is the upper half of code page 437, in which short names are
// read (Linux's default codepage).
var cp437 = []rune("ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u00a0")

// shortChars decodes the bytes of a short name.
func shortChars(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		if c < 0x80 {
			sb.WriteByte(c)
		} else {
			sb.WriteRune(cp437[c-0x80])
		}
	}
	return sb.String()
}

// Times of a short entry.
func (e *entry) mtime() time.Time { return fatTime(le16(e.raw[:], 24), le16(e.raw[:], 22), 0) }
func (e *entry) atime() time.Time { return fatTime(le16(e.raw[:], 18), 0, 0) }
func (e *entry) ctime() time.Time {
	return fatTime(le16(e.raw[:], 16), le16(e.raw[:], 14), e.raw[13])
}

// fatTime converts a FAT date and time (and hundredths of a second, up
// to 199) to a time, read as UTC. Out-of-range fields are clamped as
// Linux does: a zero date is 1980-01-01.
func fatTime(date, tm uint16, cs byte) time.Time {
	year := 1980 + int(date>>9)
	month := max(1, int(date>>5&0xF))
	day := max(1, int(date&0x1F))
	t := time.Date(year, time.Month(month), day, int(tm>>11), int(tm>>5&0x3F), 2*int(tm&0x1F), 0, time.UTC)
	if cs <= 199 {
		t = t.Add(time.Duration(cs) * 10 * time.Millisecond)
	}
	return t
}
