package ntfs

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/fsread"
)

// Windows file attributes and reparse tags this reader acts on.
const (
	fileAttrSystem  = 0x4
	tagMountPoint   = 0xA0000003
	tagSymlink      = 0xA000000C
	tagLXSymlink    = 0xA000001D
	symlinkRelative = 0x1
	maxTarget       = 4096 * 4 // PATH_MAX in UTF-16 and then some
	maxXattrValue   = 64 << 10 // Linux's XATTR_SIZE_MAX
)

// node is a file as ntfs-3g shows it.
type node struct {
	rec    *record
	stat   fsread.Stat
	target string // a symlink's
}

// ntTime converts 100 ns units since 1601 to a time.
func ntTime(t uint64) time.Time {
	const epochDiff = 11644473600 // seconds from 1601 to 1970
	return time.Unix(int64(t/1e7)-epochDiff, int64(t%1e7)*100).UTC()
}

// node works out the stat of rec: mode 0777 and owner root (ntfs-3g
// without options), the times of $STANDARD_INFORMATION.
func (f *FS) node(rec *record) (*node, error) {
	n := &node{rec: rec}
	st := &n.stat
	st.Ino, st.Nlink, st.Mode = rec.num, uint32(rec.links), fsread.TypeRegular|0o777
	var attrs uint32
	if si := rec.find(atStdInfo, ""); si != nil && si.resident && len(si.value) >= 0x24 {
		v := si.value
		st.Mtime, st.Ctime, st.Atime = ntTime(le64(v, 8)), ntTime(le64(v, 0x10)), ntTime(le64(v, 0x18))
		attrs = le32(v, 0x20)
	} else {
		return nil, fmt.Errorf("MFT record %d: no $STANDARD_INFORMATION", rec.num)
	}
	if rp := rec.find(atReparse, ""); rp != nil {
		t, ok, err := f.reparseTarget(rec, rp)
		if err != nil {
			return nil, err
		}
		if ok {
			st.Mode, st.Nlink, n.target = fsread.TypeSymlink|0o777, max(st.Nlink, 1), t
			st.Size = int64(len(t))
			return n, nil
		}
	}
	if rec.isDir() {
		st.Mode, st.Nlink = fsread.TypeDir|0o777, 1
		// ntfs-3g gives a directory the size of its INDX blocks, 0
		// without any.
		st.Size = segSize(rec.all(atIndexAlloc, "$I30"))
		return n, nil
	}
	if d := rec.all(atData, ""); len(d) > 0 {
		st.Size = segSize(d)
	}
	if attrs&fileAttrSystem != 0 {
		if err := f.interix(n); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// segSize is the data size of an attribute, given in its first segment.
func segSize(segs []*attr) int64 {
	for _, a := range segs {
		if a.lowVCN == 0 {
			return a.size
		}
	}
	return 0
}

// reparseTarget reads a symlink or junction's target; ok is false for
// the other kinds of reparse points (files as ntfs-3g shows them).
func (f *FS) reparseTarget(rec *record, rp *attr) (string, bool, error) {
	var b []byte
	if rp.resident {
		b = rp.value
	} else {
		if rp.size > 16<<10 {
			return "", false, fmt.Errorf("MFT record %d: reparse point of %d bytes (damaged)", rec.num, rp.size)
		}
		s, err := f.newStream(rec.num, []*attr{rp})
		if err != nil {
			return "", false, err
		}
		b = make([]byte, rp.size)
		if err := s.readFull(b, 0); err != nil {
			return "", false, fmt.Errorf("MFT record %d, reparse point: %w", rec.num, err)
		}
	}
	if len(b) < 8 {
		return "", false, fmt.Errorf("MFT record %d: reparse point too short", rec.num)
	}
	tag, n := le32(b, 0), int(le16(b, 4))
	if 8+n > len(b) {
		return "", false, fmt.Errorf("MFT record %d: reparse data of %d bytes past its attribute", rec.num, n)
	}
	d := b[8 : 8+n]
	bad := fmt.Errorf("MFT record %d: damaged reparse point %#x", rec.num, tag)
	switch tag {
	case tagLXSymlink:
		if len(d) < 4 {
			return "", false, bad
		}
		return string(d[4:]), true, nil
	case tagSymlink, tagMountPoint:
		hdr := 8
		if tag == tagSymlink {
			hdr = 12
		}
		if len(d) < hdr {
			return "", false, bad
		}
		so, sl, po, pl := int(le16(d, 0)), int(le16(d, 2)), int(le16(d, 4)), int(le16(d, 6))
		buf := d[hdr:]
		if so+sl > len(buf) || po+pl > len(buf) {
			return "", false, bad
		}
		sub, print := utf16String(buf[so:so+sl]), utf16String(buf[po:po+pl])
		if tag == tagSymlink && le32(d, 8)&symlinkRelative != 0 {
			return strings.ReplaceAll(print, `\`, "/"), true, nil
		}
		return windowsAbs(sub), true, nil
	}
	return "", false, nil
}

// windowsAbs turns an absolute Windows target (\??\C:\dir) into a path
// from this filesystem's root (/dir): the drive is taken to be this
// volume, what a restore of one partition can only assume.
func windowsAbs(p string) string {
	p = strings.TrimPrefix(p, `\??\`)
	if len(p) >= 2 && p[1] == ':' {
		p = p[2:]
	}
	p = strings.ReplaceAll(p, `\`, "/")
	if !strings.HasPrefix(p, "/") {
		p = "/" + p
	}
	return p
}

// interix recognises the special files ntfs-3g makes as system files: an
// empty one is a FIFO, one of a byte a socket, and one starting with an
// Interix magic a symlink or a device.
func (f *FS) interix(n *node) error {
	st := &n.stat
	switch {
	case st.Size == 0:
		st.Mode = fsread.TypeFIFO | 0o777
		return nil
	case st.Size == 1:
		st.Mode = fsread.TypeSocket | 0o777 // ntfs-3g keeps st_size 1, and 24 for devices
		return nil
	case st.Size < 8 || st.Size > 8+maxTarget:
		return nil
	}
	s, err := f.dataStream(n.rec, "")
	if err != nil {
		return err
	}
	b := make([]byte, st.Size)
	if err := s.readFull(b, 0); err != nil {
		return fmt.Errorf("MFT record %d, Interix file: %w", n.rec.num, err)
	}
	switch {
	case bytes.HasPrefix(b, []byte("IntxLNK\x01")):
		n.target = utf16String(b[8:])
		st.Mode, st.Size = fsread.TypeSymlink|0o777, int64(len(n.target))
	case (bytes.HasPrefix(b, []byte("IntxCHR\x00")) || bytes.HasPrefix(b, []byte("IntxBLK\x00"))) && len(b) == 24:
		st.Mode = fsread.TypeChar | 0o777
		if b[4] == 'B' {
			st.Mode = fsread.TypeBlock | 0o777
		}
		st.Major, st.Minor = uint32(le64(b, 8)), uint32(le64(b, 16))
	}
	return nil
}

// xattrs gives the named $DATA streams as user.NAME attributes, as
// ntfs-3g does with streams_interface=xattr.
func (f *FS) xattrs(rec *record) ([]fsread.Xattr, error) {
	var out []fsread.Xattr
	seen := map[string]bool{}
	for _, a := range rec.attrs {
		if a.typ != atData || a.name == "" || seen[a.name] {
			continue
		}
		seen[a.name] = true
		s, err := f.dataStream(rec, a.name)
		if err != nil {
			return nil, fmt.Errorf("stream %q: %w", a.name, err)
		}
		if s.size > maxXattrValue {
			f.warn(fmt.Sprintf("MFT record %d: stream %q of %d bytes is too large for an extended attribute: left out", rec.num, a.name, s.size))
			continue
		}
		v := make([]byte, s.size)
		if err := s.readFull(v, 0); err != nil {
			return nil, fmt.Errorf("stream %q: %w", a.name, err)
		}
		out = append(out, fsread.Xattr{Name: "user." + a.name, Value: v})
	}
	return out, nil
}

var errNoIndex = errors.New("directory without a $I30 index")
