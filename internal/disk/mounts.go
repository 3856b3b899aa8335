package disk

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is a range of a source that is mounted.
type Mount struct {
	Start, End int64 // bytes of the source
	Device     string
	Point      string
	ReadWrite  bool
}

// Mounts lists the mounts that use a part of the source at path: the
// device itself and its partitions, or, for an image file, the loop
// devices backed by it and their partitions.
func Mounts(path string, size int64) []Mount {
	mounted := readMountinfo()
	if len(mounted) == 0 {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil
	}
	var out []Mount
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		out = devMounts(unix.Major(st.Rdev), unix.Minor(st.Rdev), 0, size, mounted)
	case unix.S_IFREG:
		abs, err := filepath.EvalSymlinks(path)
		if err != nil {
			return nil
		}
		abs, _ = filepath.Abs(abs)
		loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, bf := range loops {
			b, err := os.ReadFile(bf)
			if err != nil || strings.TrimSpace(string(b)) != abs {
				continue
			}
			dir := filepath.Dir(filepath.Dir(bf))
			off := sysInt(filepath.Join(dir, "loop", "offset"))
			limit := sysInt(filepath.Join(dir, "loop", "sizelimit"))
			end := size
			if limit > 0 {
				end = min(size, off+limit)
			}
			var ma, mi uint32
			if b, err := os.ReadFile(filepath.Join(dir, "dev")); err == nil {
				fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &ma, &mi)
			}
			out = append(out, devMounts(ma, mi, off, end, mounted)...)
		}
	}
	return out
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

// devMounts returns the mounts of device ma:mi (which covers [start, end)
// of the source) and of its partitions.
func devMounts(ma, mi uint32, start, end int64, mounted map[string][]mountEntry) []Mount {
	var out []Mount
	key := fmt.Sprintf("%d:%d", ma, mi)
	dir := "/sys/dev/block/" + key
	name := key
	if target, err := os.Readlink(dir); err == nil {
		name = filepath.Base(target)
	}
	for _, m := range mounted[key] {
		out = append(out, Mount{Start: start, End: end, Device: "/dev/" + name, Point: m.point, ReadWrite: m.rw})
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
		pkey := strings.TrimSpace(string(b))
		ps := start + sysInt(filepath.Join(pdir, "start"))*512
		pe := min(ps+sysInt(filepath.Join(pdir, "size"))*512, end)
		for _, m := range mounted[pkey] {
			out = append(out, Mount{Start: ps, End: pe, Device: "/dev/" + e.Name(), Point: m.point, ReadWrite: m.rw})
		}
	}
	return out
}

func sysInt(p string) int64 {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n
}

// SectorSize returns a block device's logical sector size, 0 for other
// sources.
func (s *Source) SectorSize() int {
	if s.Kind != Device {
		return 0
	}
	n, err := unix.IoctlGetInt(int(s.f.Fd()), unix.BLKSSZGET)
	if err != nil {
		return 0
	}
	return n
}
