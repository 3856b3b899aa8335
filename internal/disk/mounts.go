package disk

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is a range of a file or device that a mounted filesystem uses,
// directly or through a chain of partitions, loop devices (each backed by
// the previous link, at its offset) and stacked devices (device-mapper,
// md).
type Mount struct {
	Start, End int64 // bytes of the file or device asked about
	Device     string
	Point      string
	ReadWrite  bool
	// Within is set when the mount was found through the disk that holds
	// the partition asked about (a loop device over the whole disk, an
	// extended partition's logical ones): that disk's path.
	Within string
	// Via lists the devices from the file or device asked about to
	// Device, Device last; empty when that device is itself mounted.
	Via []string
}

// Chain names the devices through which the mount uses what was asked
// about, for messages: "/dev/loop0 → /dev/loop1p1", or "its disk
// /dev/loop0 → /dev/loop2" when found through the disk holding it.
func (m Mount) Chain() string {
	s := strings.Join(m.Via, " → ")
	if m.Within != "" {
		s = "its disk " + m.Within + " → " + s
	}
	return s
}

// Mounts lists the mounts that use a part of the file or device at path
// (size bytes; 0: its size is read from sysfs): the device itself and its
// partitions, loop devices backed by the file or device and, recursively,
// whatever uses those (partitions of a loop device, a loop device over
// another loop device, a device-mapper or md device stacked on one). For a
// partition, mounts that use the disk holding it are included where they
// overlap the partition.
func Mounts(path string, size int64) []Mount {
	mounted := readMountinfo()
	if len(mounted) == 0 {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil
	}
	w := &mountWalk{mounted: mounted, loops: readLoops(), seen: map[string]bool{}}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		key := devKey(st.Rdev)
		if size <= 0 {
			size = sysInt("/sys/dev/block/"+key+"/size") * 512
		}
		w.device(key, 0, size, nil)
		w.parentDisk(key, size)
	case unix.S_IFREG:
		w.backedBy(fileID{dev: st.Dev, ino: st.Ino}, 0, size, []string{})
	}
	return w.out
}

func devKey(rdev uint64) string { return fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev)) }

// fileID identifies what backs a loop device: a file by its inode, a
// block device by its device number (rdev set, dev and ino zero).
type fileID struct {
	dev, ino uint64
	rdev     string
}

// loopDev is a bound loop device.
type loopDev struct {
	key           string // major:minor
	backing       fileID
	offset, limit int64
}

// readLoops lists the bound loop devices and what backs them, from sysfs.
func readLoops() []loopDev {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []loopDev
	for _, bf := range files {
		b, err := os.ReadFile(bf)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if err := unix.Stat(strings.TrimSpace(string(b)), &st); err != nil {
			continue // deleted, or outside this mount namespace
		}
		id := fileID{dev: st.Dev, ino: st.Ino}
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			id = fileID{rdev: devKey(st.Rdev)}
		}
		dir := filepath.Dir(filepath.Dir(bf))
		k, err := os.ReadFile(filepath.Join(dir, "dev"))
		if err != nil {
			continue
		}
		out = append(out, loopDev{key: strings.TrimSpace(string(k)), backing: id,
			offset: sysInt(filepath.Join(dir, "loop", "offset")), limit: sysInt(filepath.Join(dir, "loop", "sizelimit"))})
	}
	return out
}

// mountWalk follows the devices built on a file or device.
type mountWalk struct {
	mounted map[string][]mountEntry
	loops   []loopDev
	seen    map[string]bool
	within  string
	out     []Mount
}

// maxDepth bounds the chains followed (loops cannot form cycles, but a
// racing losetup could make sysfs look odd).
const maxDepth = 16

// backedBy follows the loop devices backed by id, which covers [start,
// end) of what was asked about.
func (w *mountWalk) backedBy(id fileID, start, end int64, via []string) {
	for _, l := range w.loops {
		if l.backing != id {
			continue
		}
		s, e := start+l.offset, end
		if l.limit > 0 {
			e = min(e, s+l.limit)
		}
		w.device(l.key, s, max(s, e), via)
	}
}

// device records the mounts of device key (covering [start, end)) and
// follows its partitions, the loop devices it backs and its holders. via
// is the chain that led to it, nil for the device asked about.
func (w *mountWalk) device(key string, start, end int64, via []string) {
	if w.seen[key] || len(via) > maxDepth {
		return
	}
	w.seen[key] = true
	dir := "/sys/dev/block/" + key
	dev := key
	if target, err := os.Readlink(dir); err == nil {
		dev = "/dev/" + filepath.Base(target)
	}
	if via != nil {
		via = append(slices.Clip(via), dev)
	}
	for _, m := range w.mounted[key] {
		w.out = append(w.out, Mount{Start: start, End: end, Device: dev, Point: m.point, ReadWrite: m.rw, Within: w.within, Via: via})
	}
	if via == nil {
		// The device asked about (via nil): what is built on it starts
		// the chain.
		via = []string{}
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		pdir := filepath.Join(dir, e.Name())
		if _, err := os.Stat(filepath.Join(pdir, "partition")); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(pdir, "dev"))
		if err != nil {
			continue
		}
		ps := start + sysInt(filepath.Join(pdir, "start"))*512
		pe := min(ps+sysInt(filepath.Join(pdir, "size"))*512, end)
		w.device(strings.TrimSpace(string(b)), ps, max(ps, pe), via)
	}
	w.backedBy(fileID{rdev: key}, start, end, via)
	holders, _ := os.ReadDir(filepath.Join(dir, "holders"))
	for _, h := range holders {
		if b, err := os.ReadFile(filepath.Join(dir, "holders", h.Name(), "dev")); err == nil {
			w.device(strings.TrimSpace(string(b)), start, end, via) // its mapping is not known: all of it
		}
	}
}

// parentDisk adds, for a partition key of size bytes, the mounts that use
// the disk holding it and overlap the partition: a loop device over the
// whole disk, logical partitions inside an extended one.
func (w *mountWalk) parentDisk(key string, size int64) {
	dir, err := filepath.EvalSymlinks("/sys/dev/block/" + key)
	if err != nil {
		return
	}
	if _, err := os.Stat(filepath.Join(dir, "partition")); err != nil {
		return
	}
	parent := filepath.Dir(dir)
	b, err := os.ReadFile(filepath.Join(parent, "dev"))
	if err != nil {
		return
	}
	pkey := strings.TrimSpace(string(b))
	ps := sysInt(filepath.Join(dir, "start")) * 512
	w.within = "/dev/" + filepath.Base(parent)
	own := len(w.out)
	// The disk itself cannot be mounted while a partition of it is; what
	// uses it is found in its coordinates: its other partitions and the
	// loop devices it backs.
	w.seen[pkey] = true
	ents, _ := os.ReadDir(parent)
	for _, e := range ents {
		pdir := filepath.Join(parent, e.Name())
		if _, err := os.Stat(filepath.Join(pdir, "partition")); err != nil {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(pdir, "dev")); err == nil {
			s := sysInt(filepath.Join(pdir, "start")) * 512
			w.device(strings.TrimSpace(string(b)), s, s+sysInt(filepath.Join(pdir, "size"))*512, []string{})
		}
	}
	w.backedBy(fileID{rdev: pkey}, 0, sysInt(filepath.Join(parent, "size"))*512, []string{})
	// Keep what overlaps the partition, in its coordinates.
	kept := w.out[:own]
	for _, m := range w.out[own:] {
		s, e := max(m.Start, ps)-ps, min(m.End, ps+size)-ps
		if s < e {
			m.Start, m.End = s, e
			kept = append(kept, m)
		}
	}
	w.out = kept
	w.within = ""
}

type mountEntry struct {
	point string
	rw    bool
}

// readMountinfo maps "major:minor" to the mounts of that device.
func readMountinfo() map[string][]mountEntry {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	out := map[string][]mountEntry{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			continue
		}
		rw := false
		for _, o := range strings.Split(fields[5], ",") {
			if o == "rw" {
				rw = true
			}
		}
		out[fields[2]] = append(out[fields[2]], mountEntry{point: unescapeMount(fields[4]), rw: rw})
	}
	return out
}

// unescapeMount undoes the octal escapes of mountinfo (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func sysInt(p string) int64 {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n
}

// SectorSize asks the kernel for a block device's logical sector size
// (BLKSSZGET); 0 when it cannot tell (a file).
func SectorSize(f *os.File) int {
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
	if err != nil {
		return 0
	}
	return n
}
