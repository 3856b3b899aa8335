package shadow

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
)

// lvmMark begins the name of every LVM snapshot sauve takes:
// sauve-snap-PID-RANDOM in the origin's volume group, so that a leftover
// is found by its name and its maker's PID tells whether it is in use.
const lvmMark = "sauve-snap-"

// lvsFields are the columns of every lvs report sauve reads.
const lvsFields = "lv_name,vg_name,lv_attr,lv_size,seg_type,pool_lv,origin,snap_percent,lv_path,vg_free,vg_extent_size"

// lvmRunner runs one of LVM2's commands (lvs, lvcreate, lvchange,
// lvremove) and returns what it printed on standard output.
type lvmRunner interface {
	run(ctx context.Context, cmd string, args ...string) ([]byte, error)
}

// lvmTool runs the installed LVM2 commands.
type lvmTool struct{}

const (
	lvmTimeout   = 2 * time.Minute
	lvmOutputMax = 4 << 20
	lvmStderrMax = 64 << 10
)

func (lvmTool) run(ctx context.Context, cmd string, args ...string) ([]byte, error) {
	path, err := lvmPath(cmd)
	if err != nil {
		return nil, errUnsupported{err}
	}
	ctx, cancel := context.WithTimeout(ctx, lvmTimeout)
	defer cancel()
	c := exec.CommandContext(ctx, path, args...)
	// LVM warns on standard error about every descriptor it inherits.
	c.Env = append(os.Environ(), "LC_ALL=C", "LVM_SUPPRESS_FD_WARNINGS=1")
	// SIGTERM first: a SIGKILL while LVM holds a device suspended would
	// leave it suspended.
	c.Cancel = func() error { return c.Process.Signal(syscall.SIGTERM) }
	c.WaitDelay = 15 * time.Second
	out := &capped{max: lvmOutputMax}
	stderr := &capped{max: lvmStderrMax}
	c.Stdout, c.Stderr = out, stderr
	err = c.Run()
	if err == nil && out.over {
		err = fmt.Errorf("printed more than %d bytes", lvmOutputMax)
	}
	if err != nil {
		line := cmd + " " + strings.Join(args, " ")
		if msg := oneLine(stderr.buf.String()); msg != "" {
			return nil, fmt.Errorf("%s: %w: %s", line, err, msg)
		}
		return nil, fmt.Errorf("%s: %w", line, err)
	}
	return out.buf.Bytes(), nil
}

// lvmPath finds an LVM command in $PATH, or where LVM2 installs them: a
// PATH without sbin (cron's) must not make auto read a volume as it is.
func lvmPath(cmd string) (string, error) {
	path, err := exec.LookPath(cmd)
	if err == nil {
		return path, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if st, serr := os.Stat(filepath.Join(dir, cmd)); serr == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return filepath.Join(dir, cmd), nil
		}
	}
	return "", fmt.Errorf("%s is not installed (LVM2's tools): %w", cmd, err)
}

// capped keeps the first max bytes written to it and drops the rest.
// (The buffer is not embedded: its ReadFrom would take all there is.)
type capped struct {
	buf  bytes.Buffer
	max  int
	over bool
}

func (c *capped) Write(p []byte) (int, error) {
	room := c.max - c.buf.Len()
	if len(p) > room {
		c.over = true
		c.buf.Write(p[:max(room, 0)])
		return len(p), nil
	}
	return c.buf.Write(p)
}

// oneLine joins the lines of a command's standard error, at most 500
// bytes of them.
func oneLine(s string) string {
	var parts []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			parts = append(parts, l)
		}
	}
	s = strings.Join(parts, "; ")
	if len(s) > 500 {
		s = s[:500] + "…"
	}
	return strings.ToValidUTF8(s, "?")
}

// logicalVolume is one row of an lvs report.
type logicalVolume struct {
	name, vg, attr, seg, pool, origin, path string
	size                                    int64
	vgFree, extent                          int64   // -1: not reported
	snapPercent                             float64 // -1: not reported
}

func (lv logicalVolume) id() string { return lv.vg + "/" + lv.name }

// attrAt is the i-th character of lv_attr ('-' past its end).
func (lv logicalVolume) attrAt(i int) byte {
	if i < len(lv.attr) {
		return lv.attr[i]
	}
	return '-'
}

// thin says whether lv is a thin volume, whose snapshots take their space
// from its pool and need no size.
func (lv logicalVolume) thin() bool { return lv.attrAt(0) == 'V' || lv.seg == "thin" }

// lvmValue is a field of lvs' JSON report: a string (--reportformat
// json), or a number (json_std, for numeric fields).
type lvmValue string

func (v *lvmValue) UnmarshalJSON(b []byte) error {
	switch {
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*v = lvmValue(s)
	case string(b) == "null":
		*v = ""
	default:
		var n json.Number
		if err := json.Unmarshal(b, &n); err != nil {
			return err
		}
		*v = lvmValue(n)
	}
	return nil
}

type lvsRow struct {
	Name        lvmValue `json:"lv_name"`
	VG          lvmValue `json:"vg_name"`
	Attr        lvmValue `json:"lv_attr"`
	Size        lvmValue `json:"lv_size"`
	Seg         lvmValue `json:"seg_type"`
	Pool        lvmValue `json:"pool_lv"`
	Origin      lvmValue `json:"origin"`
	SnapPercent lvmValue `json:"snap_percent"`
	Path        lvmValue `json:"lv_path"`
	VGFree      lvmValue `json:"vg_free"`
	ExtentSize  lvmValue `json:"vg_extent_size"`
}

// parseLVs reads the volumes of an lvs report (--reportformat json, -o
// lvsFields, --units b --nosuffix), one entry a volume: asked for
// seg_type, lvs prints a row for each segment of a volume.
func parseLVs(b []byte) ([]logicalVolume, error) {
	var doc struct {
		Report *[]struct {
			LV []lvsRow `json:"lv"`
		} `json:"report"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("read lvs' report: %w", err)
	}
	if doc.Report == nil {
		return nil, errors.New("read lvs' report: it has no \"report\"")
	}
	var lvs []logicalVolume
	for _, r := range *doc.Report {
		for _, row := range r.LV {
			lv, err := row.volume()
			if err != nil {
				return nil, fmt.Errorf("read lvs' report, volume %d: %w", len(lvs)+1, err)
			}
			if n := len(lvs) - 1; n >= 0 && lvs[n].id() == lv.id() {
				if lv.seg == "thin" {
					lvs[n].seg = lv.seg
				}
				continue
			}
			lvs = append(lvs, lv)
		}
	}
	return lvs, nil
}

// lvmName is what LVM accepts as a VG or LV name; it never begins with a
// hyphen, so that a name is never read as an option.
var lvmName = regexp.MustCompile(`^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,127}$`)

func (r lvsRow) volume() (logicalVolume, error) {
	lv := logicalVolume{name: string(r.Name), vg: string(r.VG), attr: string(r.Attr), seg: string(r.Seg),
		pool: string(r.Pool), origin: string(r.Origin), path: string(r.Path)}
	for _, n := range []string{lv.name, lv.vg} {
		if !lvmName.MatchString(n) || n == "." || n == ".." {
			return lv, fmt.Errorf("name %q is not an LVM name", n)
		}
	}
	if lv.attr == "" || len(lv.attr) > 16 {
		return lv, fmt.Errorf("%s: lv_attr %q", lv.id(), lv.attr)
	}
	var err error
	if lv.size, err = lvmBytes(string(r.Size)); err != nil || lv.size < 0 {
		return lv, fmt.Errorf("%s: lv_size %q", lv.id(), r.Size)
	}
	if lv.vgFree, err = lvmBytes(string(r.VGFree)); err != nil {
		return lv, fmt.Errorf("%s: vg_free %q", lv.id(), r.VGFree)
	}
	if lv.extent, err = lvmBytes(string(r.ExtentSize)); err != nil {
		return lv, fmt.Errorf("%s: vg_extent_size %q", lv.id(), r.ExtentSize)
	}
	if lv.snapPercent, err = lvmPercent(string(r.SnapPercent)); err != nil {
		return lv, fmt.Errorf("%s: snap_percent %q", lv.id(), r.SnapPercent)
	}
	return lv, nil
}

// lvmBytes reads a size lvs printed in bytes (-1 when empty).
func lvmBytes(s string) (int64, error) {
	if s == "" {
		return -1, nil
	}
	s = strings.TrimSuffix(strings.TrimSuffix(s, "B"), "b")
	s, _, _ = strings.Cut(s, ".") // sizes in bytes have no fraction to keep
	n, err := strconv.ParseUint(s, 10, 62)
	return int64(n), err
}

// lvmPercent reads a percentage lvs printed (-1 when empty).
func lvmPercent(s string) (float64, error) {
	if s == "" {
		return -1, nil
	}
	p, err := strconv.ParseFloat(s, 64)
	if err == nil && (math.IsNaN(p) || p < 0 || p > 100) {
		err = errors.New("out of range")
	}
	return p, err
}

// lvmPlanner plans LVM snapshots; open opens the snapshot's device, name
// names a snapshot.
type lvmPlanner struct {
	lvm  lvmRunner
	open func(ctx context.Context, path string) (*source.Source, error)
	name func() (string, error)
	o    Options
}

// planLVM plans an LVM snapshot of the logical volume src. A device that
// is no logical volume, or a host without LVM, is errUnsupported.
func planLVM(ctx context.Context, src *source.Source, o Options) (*plan, error) {
	arg, err := lvmDeviceArg(src)
	if err != nil {
		return nil, err
	}
	p := lvmPlanner{lvm: lvmTool{}, open: source.Open, name: func() (string, error) { return snapName(lvmMark) }, o: o}
	return p.plan(ctx, src, arg)
}

// lvmDeviceArg checks that src is a device-mapper device, as every
// logical volume is, and returns the name lvs knows it by: LVM reads
// /dev/VG/LV and /dev/mapper/VG-LV, not /dev/dm-N.
func lvmDeviceArg(src *source.Source) (string, error) {
	f := src.File()
	var st unix.Stat_t
	if f == nil || unix.Fstat(int(f.Fd()), &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return "", errUnsupported{fmt.Errorf("%s is not a block device", src.Path)}
	}
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	if _, err := os.Stat(sys); err != nil {
		return src.Path, nil // no sysfs: let lvs tell
	}
	name, err := os.ReadFile(sys + "/dm/name")
	if err != nil {
		return "", errUnsupported{fmt.Errorf("%s is not a device-mapper device, so no LVM logical volume", src.Path)}
	}
	dm := strings.TrimSpace(string(name))
	if strings.HasPrefix(filepath.Base(src.Path), "dm-") && dm != "" && !strings.Contains(dm, "/") {
		return "/dev/mapper/" + dm, nil
	}
	return src.Path, nil
}

// plan checks the logical volume arg (src), removes the snapshots that
// interrupted backups left, and chooses the lvcreate command. A thin
// volume's snapshot takes no size: --snapshot-size is for thick ones.
func (p lvmPlanner) plan(ctx context.Context, src *source.Source, arg string) (*plan, error) {
	origin, err := p.volume(ctx, arg)
	if err != nil {
		return nil, errUnsupported{fmt.Errorf("%s is not an LVM logical volume: %w", src.Path, err)}
	}
	if a := origin.attrAt(0); a == 's' || a == 'S' {
		return nil, errUnsupported{fmt.Errorf("%s is itself an LVM snapshot (%s), and LVM snapshots no snapshot", src.Path, origin.id())}
	}
	p.removeLeftovers(ctx)
	name, err := p.name()
	if err != nil {
		return nil, err
	}
	args := []string{"-s", "-n", name}
	if !origin.thin() {
		size, err := p.cowSize(src, origin)
		if err != nil {
			return nil, err
		}
		args = append(args, size...)
	}
	args = append(args, origin.id())
	// Device-mapper suspends the origin for the instant of the snapshot,
	// which freezes the filesystem on it: a FIFREEZE of our own around
	// lvcreate would deadlock against that.
	return &plan{src: src, mode: LVM, freeze: []string{}, take: func(ctx context.Context) (*source.View, error) {
		return p.take(ctx, src, origin, name, args)
	}}, nil
}

// volume reports the one logical volume arg names.
func (p lvmPlanner) volume(ctx context.Context, arg string) (logicalVolume, error) {
	out, err := p.lvm.run(ctx, "lvs", "--reportformat", "json", "-o", lvsFields, "--units", "b", "--nosuffix", arg)
	if err != nil {
		return logicalVolume{}, err
	}
	lvs, err := parseLVs(out)
	if err != nil {
		return logicalVolume{}, err
	}
	if len(lvs) != 1 {
		return logicalVolume{}, fmt.Errorf("lvs %s reported %d volumes, want 1", arg, len(lvs))
	}
	return lvs[0], nil
}

var (
	lvmSize        = regexp.MustCompile(`^([0-9]{1,15})(\.[0-9]{1,6})?([bBsSkKmMgGtTpPeE]?)$`)
	lvmPercentSize = regexp.MustCompile(`^[0-9]{1,3}%(ORIGIN|VG|FREE|PVS)$`)
)

// cowSize returns lvcreate's size arguments for a thick snapshot of
// origin: --snapshot-size, or defaultCOW within what the VG has free.
func (p lvmPlanner) cowSize(src *source.Source, origin logicalVolume) ([]string, error) {
	if s := p.o.SnapshotSize; s != "" {
		if lvmPercentSize.MatchString(s) {
			return []string{"-l", s}, nil
		}
		n, ok := lvmSizeBytes(s)
		if !ok {
			return nil, fmt.Errorf("--snapshot-size %q: give a size such as 10G or 512M, or a share such as 20%%ORIGIN", s)
		}
		if origin.vgFree >= 0 && n > origin.vgFree {
			return nil, fmt.Errorf("--snapshot-size %s: volume group %s has only %s free for the snapshot of %s", s, origin.vg, sizeText(origin.vgFree), src.Path)
		}
		return []string{"-L", s}, nil
	}
	n := defaultCOW(origin.size)
	if origin.vgFree >= 0 && n > origin.vgFree {
		n = origin.vgFree
		if origin.extent > 0 {
			n -= n % origin.extent
		}
		if n <= 0 {
			err := fmt.Errorf("volume group %s has no free space for a snapshot of %s", origin.vg, src.Path)
			if p.o.Mode == Auto {
				p.o.Warn(fmt.Sprintf("no LVM snapshot of %s: %v; it is read as it is", src.Path, err))
			}
			return nil, errUnsupported{err}
		}
		p.o.Warn(fmt.Sprintf("volume group %s has only %s free: the LVM snapshot of %s gets that much COW space (a backup that fills it fails and stores nothing; free space in %s or give --snapshot-size)", origin.vg, sizeText(n), src.Path, origin.vg))
	}
	return []string{"-L", strconv.FormatInt(n, 10) + "b"}, nil
}

// defaultCOW is the COW space of a thick snapshot when --snapshot-size is
// not given. The COW space keeps one copy of each origin block first
// written while the snapshot lives, which is while the backup reads the
// volume once: a tenth of the volume covers all but bulk rewrites, and
// Verify fails a backup whose snapshot filled rather than store it. It is
// at least 1 GiB, since a tenth of a small volume is what one log
// rotation fills, and at most the origin's size, since no more than the
// whole volume is ever copied aside (LVM rounds up to whole extents).
func defaultCOW(origin int64) int64 {
	return min(max(origin/10, 1<<30), origin)
}

// lvmSizeBytes reads a size as lvcreate -L does (MiB when it has no
// unit; units are powers of 1024 in either case).
func lvmSizeBytes(s string) (int64, bool) {
	m := lvmSize.FindStringSubmatch(s)
	if m == nil {
		return 0, false
	}
	shift := map[string]uint{"": 20, "b": 0, "s": 9, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}[strings.ToLower(m[3])]
	f, err := strconv.ParseFloat(m[1]+m[2], 64)
	if err != nil {
		return 0, false
	}
	b := f * math.Exp2(float64(shift))
	if b < 1 || b > 1<<62 {
		return 0, false
	}
	return int64(b), true
}

// take creates the snapshot, activates it if it is thin (LVM creates
// thin snapshots with the activation-skip flag) and opens it.
func (p lvmPlanner) take(ctx context.Context, src *source.Source, origin logicalVolume, name string, args []string) (*source.View, error) {
	id := origin.vg + "/" + name
	// LVM is not interrupted in the middle of changing volumes.
	if _, err := p.lvm.run(context.WithoutCancel(ctx), "lvcreate", args...); err != nil {
		return nil, fmt.Errorf("LVM snapshot of %s: %w", src.Path, err)
	}
	fail := func(err error) (*source.View, error) {
		if rerr := p.remove(id); rerr != nil {
			err = fmt.Errorf("%w; %v", err, rerr)
		}
		return nil, err
	}
	if origin.thin() {
		if _, err := p.lvm.run(context.WithoutCancel(ctx), "lvchange", "-ay", "-K", id); err != nil {
			return fail(fmt.Errorf("activate the LVM snapshot %s: %w", id, err))
		}
	}
	dev := snapDevice(origin, name)
	s, err := p.open(ctx, dev)
	if err != nil {
		return fail(fmt.Errorf("open the LVM snapshot %s: %w", dev, err))
	}
	v := &source.View{Of: src, At: s.At, Size: s.Size, SectorSize: s.SectorSize, Copy: string(LVM)}
	v.Release = sync.OnceValue(func() error {
		s.Close()
		return p.remove(id)
	})
	v.Verify = func() error { return p.verify(id, origin) }
	if !origin.thin() {
		// A thin snapshot shares its pool with the origin: lvs tells no
		// space as the snapshot's own.
		v.CopyUsed = func() int64 { return p.cowUsed(id) }
	}
	return v, nil
}

// snapDevice is the device of the snapshot name of origin, beside the
// origin's own (/dev/VG/LV).
func snapDevice(origin logicalVolume, name string) string {
	if dir, ok := strings.CutSuffix(origin.path, "/"+origin.vg+"/"+origin.name); ok && strings.HasPrefix(dir, "/") {
		return dir + "/" + origin.vg + "/" + name
	}
	return "/dev/" + origin.vg + "/" + name
}

// lvmQuiet bounds the LVM commands that run where no context is given.
func lvmQuiet() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), lvmTimeout)
}

// remove deletes the snapshot id, whatever became of the backup.
func (p lvmPlanner) remove(id string) error {
	ctx, cancel := lvmQuiet()
	defer cancel()
	if _, err := p.lvm.run(ctx, "lvremove", "-f", id); err != nil {
		return fmt.Errorf("remove the LVM snapshot %s: %w (remove it with lvremove %s)", id, err, id)
	}
	return nil
}

// verify checks, once the backup has read the snapshot id, that it held:
// a thick snapshot whose COW space filled is invalid, and what was read
// from it may be torn.
func (p lvmPlanner) verify(id string, origin logicalVolume) error {
	ctx, cancel := lvmQuiet()
	defer cancel()
	lv, err := p.volume(ctx, id)
	if err != nil {
		return fmt.Errorf("check the LVM snapshot %s after reading it: %w", id, err)
	}
	if origin.thin() {
		if lv.attrAt(8) == 'F' {
			return fmt.Errorf("the thin LVM snapshot %s failed during the backup (its pool %s/%s failed): nothing stored", id, origin.vg, origin.pool)
		}
		return nil
	}
	if st := lv.attrAt(4); st == 'I' || st == 'S' || lv.snapPercent >= 100 {
		return fmt.Errorf("the LVM snapshot %s filled its COW space (%s) during the backup: nothing stored; give --snapshot-size more", id, sizeText(lv.size))
	}
	return nil
}

// cowUsed is how much of its COW space the snapshot id uses, -1 when lvs
// does not say.
func (p lvmPlanner) cowUsed(id string) int64 {
	ctx, cancel := lvmQuiet()
	defer cancel()
	lv, err := p.volume(ctx, id)
	if err != nil || lv.snapPercent < 0 {
		return -1
	}
	return int64(lv.snapPercent / 100 * float64(lv.size))
}

// removeLeftovers deletes the snapshots that a process no longer running
// left (killed before its Release), in every volume group.
func (p lvmPlanner) removeLeftovers(ctx context.Context) {
	out, err := p.lvm.run(ctx, "lvs", "--reportformat", "json", "-o", lvsFields, "--units", "b", "--nosuffix", "-S", "lv_name=~^"+lvmMark)
	var lvs []logicalVolume
	if err == nil {
		lvs, err = parseLVs(out)
	}
	if err != nil {
		p.o.Warn(fmt.Sprintf("cannot look for the LVM snapshots interrupted backups left: %v", err))
		return
	}
	for _, lv := range lvs {
		pid := snapPID(lv.name, lvmMark)
		if a := lv.attrAt(0); pid == 0 || (a != 's' && a != 'S' && a != 'V') || alive(pid) {
			continue
		}
		if err := p.remove(lv.id()); err != nil {
			p.o.Warn(fmt.Sprintf("cannot remove %s, the LVM snapshot an interrupted backup (process %d) left: %v", lv.id(), pid, err))
			continue
		}
		p.o.Warn(fmt.Sprintf("removed %s, the LVM snapshot an interrupted backup (process %d) left", lv.id(), pid))
	}
}

// sizeText writes n bytes for people: 1.5 GiB.
func sizeText(n int64) string {
	units := []string{"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	f, u := float64(n), 0
	for f >= 1024 && u < len(units)-1 {
		f /= 1024
		u++
	}
	if u == 0 {
		return fmt.Sprintf("%d bytes", n)
	}
	return fmt.Sprintf("%.1f %s", f, units[u])
}
