// Package machine finds out what the machine whose disks are backed up
// is made of (CPUs, memory, firmware, disk controllers, network cards),
// so that a snapshot records it and an export or a migration can define
// the virtual machine around the disks: the machine sauve runs on, from
// /proc and /sys, or a QEMU VM, through its monitor. What cannot be
// found is left empty; nothing here fails a backup.
package machine

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/sauve-backup/sauve/internal/repo"
)

// Roots are where Local reads the kernel's views ("/sys" and "/proc";
// a test gives a tree of its own).
type Roots struct{ Sys, Proc string }

// DefaultRoots are the running kernel's.
func DefaultRoots() Roots { return Roots{Sys: "/sys", Proc: "/proc"} }

// Local describes the machine sauve runs on; disks maps each disk's name
// in the snapshot to its device (/dev/sda, /dev/nvme0n1p2), whose
// controller is looked up.
func Local(r Roots, disks map[string]string) *repo.Machine {
	m := &repo.Machine{Kind: "physical", CPUs: cpus(r), MemoryMiB: memoryMiB(r), Firmware: "bios"}
	if _, err := os.Stat(filepath.Join(r.Sys, "firmware", "efi")); err == nil {
		m.Firmware = "uefi"
	}
	for name, dev := range disks {
		if c := controller(r, dev); c != "" {
			if m.Controllers == nil {
				m.Controllers = map[string]string{}
			}
			m.Controllers[name] = c
		}
	}
	m.NICs = nics(r)
	return m
}

func cpus(r Roots) int {
	b, err := os.ReadFile(filepath.Join(r.Sys, "devices", "system", "cpu", "online"))
	if err != nil {
		return 0
	}
	n := 0
	for _, part := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, ok := strings.Cut(part, "-")
		a, err1 := strconv.Atoi(lo)
		z := a
		var err2 error
		if ok {
			z, err2 = strconv.Atoi(hi)
		}
		if err1 != nil || err2 != nil || z < a {
			return 0
		}
		n += z - a + 1
	}
	return n
}

func memoryMiB(r Roots) int64 {
	f, err := os.Open(filepath.Join(r.Proc, "meminfo"))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb >> 10
		}
	}
	return 0
}

// controller names the controller of the disk dev is (or is a partition
// of), from the driver of its device in /sys.
func controller(r Roots, dev string) string {
	name := filepath.Base(dev)
	blk := filepath.Join(r.Sys, "class", "block", name)
	if _, err := os.Stat(filepath.Join(blk, "partition")); err == nil {
		// A partition: its disk is the folder above it.
		if p, err := filepath.EvalSymlinks(blk); err == nil {
			blk, name = filepath.Dir(p), filepath.Base(filepath.Dir(p))
		}
	}
	switch {
	case strings.HasPrefix(name, "nvme"):
		return "nvme"
	case strings.HasPrefix(name, "vd"):
		return "virtio"
	case strings.HasPrefix(name, "hd"):
		return "ide"
	case strings.HasPrefix(name, "sd"):
		vendor, _ := os.ReadFile(filepath.Join(blk, "device", "vendor"))
		if strings.TrimSpace(string(vendor)) == "ATA" {
			return "sata"
		}
		return "scsi"
	}
	return ""
}

// nics lists the network cards with a device behind them (not lo,
// bridges, bonds or veths), by name.
func nics(r Roots) []repo.NIC {
	ents, err := os.ReadDir(filepath.Join(r.Sys, "class", "net"))
	if err != nil {
		return nil
	}
	var out []repo.NIC
	for _, e := range ents {
		dir := filepath.Join(r.Sys, "class", "net", e.Name())
		if _, err := os.Stat(filepath.Join(dir, "device")); err != nil {
			continue
		}
		mac, err := os.ReadFile(filepath.Join(dir, "address"))
		if err != nil {
			continue
		}
		n := repo.NIC{MAC: strings.TrimSpace(string(mac))}
		if drv, err := filepath.EvalSymlinks(filepath.Join(dir, "device", "driver")); err == nil {
			n.Model = filepath.Base(drv)
		}
		out = append(out, n)
	}
	return out
}

// Executor runs a QMP command (a *qmp.Client does).
type Executor interface {
	Execute(ctx context.Context, command string, args, result any) error
}

// QEMU describes a running QEMU VM through its monitor; drives maps each
// disk's name in the snapshot to the QOM path of its device.
func QEMU(ctx context.Context, c Executor, drives map[string]string) *repo.Machine {
	m := &repo.Machine{Kind: "qemu", Firmware: "bios"}
	var cpus []struct{}
	if c.Execute(ctx, "query-cpus-fast", nil, &cpus) == nil {
		m.CPUs = len(cpus)
	}
	var mem struct {
		Base int64 `json:"base-memory"`
	}
	if c.Execute(ctx, "query-memory-size-summary", nil, &mem) == nil {
		m.MemoryMiB = mem.Base >> 20
	}
	var blocks []struct {
		Device string `json:"device"`
		QDev   string `json:"qdev"`
	}
	if c.Execute(ctx, "query-block", nil, &blocks) == nil {
		for _, b := range blocks {
			if strings.HasPrefix(b.Device, "pflash") || strings.Contains(b.QDev, "pflash") {
				m.Firmware = "uefi" // OVMF's code and variables are pflash drives
			}
		}
	}
	for name, qdev := range drives {
		var typ string
		if qdev == "" || c.Execute(ctx, "qom-get", map[string]any{"path": qdev, "property": "type"}, &typ) != nil {
			continue
		}
		if ctl := qemuController(typ); ctl != "" {
			if m.Controllers == nil {
				m.Controllers = map[string]string{}
			}
			m.Controllers[name] = ctl
		}
	}
	var info string
	if c.Execute(ctx, "human-monitor-command", map[string]any{"command-line": "info network"}, &info) == nil {
		m.NICs = parseNetwork(info)
	}
	return m
}

// qemuController maps a QEMU disk device type to a controller kind.
func qemuController(typ string) string {
	switch {
	case strings.HasPrefix(typ, "virtio-blk"):
		return "virtio"
	case strings.HasPrefix(typ, "ide-"):
		return "ide"
	case strings.HasPrefix(typ, "scsi-"):
		return "scsi"
	case strings.HasPrefix(typ, "nvme"):
		return "nvme"
	}
	return ""
}

var nicLine = regexp.MustCompile(`model=([A-Za-z0-9_.-]+),macaddr=([0-9a-fA-F:]{17})`)

// parseNetwork reads the NICs out of HMP's "info network": lines such as
// "net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56".
func parseNetwork(info string) []repo.NIC {
	var out []repo.NIC
	for _, m := range nicLine.FindAllStringSubmatch(info, -1) {
		out = append(out, repo.NIC{Model: m[1], MAC: strings.ToLower(m[2])})
	}
	return out
}
