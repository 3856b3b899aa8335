package machine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/sauve-backup/sauve/internal/repo"
)

// fakeRoots builds a /sys and /proc of a machine with 2 online CPU
// ranges, 8 GiB, UEFI, an ATA disk with a partition, an NVMe disk, a
// network card and a bridge.
func fakeRoots(t *testing.T) Roots {
	root := t.TempDir()
	r := Roots{Sys: filepath.Join(root, "sys"), Proc: filepath.Join(root, "proc")}
	write := func(p, s string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, p string) {
		t.Helper()
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(r.Sys, "devices/system/cpu/online"), "0-3,6-7\n")
	write(filepath.Join(r.Proc, "meminfo"), "MemTotal:        8388608 kB\nMemFree: 1 kB\n")
	os.MkdirAll(filepath.Join(r.Sys, "firmware/efi"), 0o755)
	// sda (ATA) and its partition sda1, as /sys/class/block links them.
	dev := filepath.Join(r.Sys, "devices/pci0000:00/ata1/host0/block/sda")
	write(filepath.Join(dev, "device/vendor"), "ATA     \n")
	write(filepath.Join(dev, "sda1/partition"), "1\n")
	link(dev, filepath.Join(r.Sys, "class/block/sda"))
	link(filepath.Join(dev, "sda1"), filepath.Join(r.Sys, "class/block/sda1"))
	os.MkdirAll(filepath.Join(r.Sys, "class/block/nvme0n1"), 0o755)
	// eth0 has a device and a driver; br0 does not.
	write(filepath.Join(r.Sys, "class/net/eth0/address"), "52:54:00:aa:bb:cc\n")
	os.MkdirAll(filepath.Join(r.Sys, "bus/pci/drivers/e1000e"), 0o755)
	os.MkdirAll(filepath.Join(r.Sys, "class/net/eth0/device"), 0o755)
	link(filepath.Join(r.Sys, "bus/pci/drivers/e1000e"), filepath.Join(r.Sys, "class/net/eth0/device/driver"))
	write(filepath.Join(r.Sys, "class/net/br0/address"), "02:00:00:00:00:01\n")
	return r
}

func TestLocal(t *testing.T) {
	r := fakeRoots(t)
	m := Local(r, map[string]string{"sda": "/dev/sda", "root": "/dev/sda1", "fast": "/dev/nvme0n1", "img": "/dev/loop0"})
	b, _ := json.Marshal(m)
	want := `{"kind":"physical","cpus":6,"memory_mib":8192,"firmware":"uefi","controllers":{"fast":"nvme","root":"sata","sda":"sata"},"nics":[{"mac":"52:54:00:aa:bb:cc","model":"e1000e"}]}`
	if string(b) != want {
		t.Errorf("Local:\n%s\nwant\n%s", b, want)
	}
	// Nothing readable: an empty description, not a failure.
	if m := Local(Roots{Sys: t.TempDir(), Proc: t.TempDir()}, nil); m.CPUs != 0 || m.MemoryMiB != 0 || m.Firmware != "bios" || m.NICs != nil {
		t.Errorf("Local of nothing: %+v", m)
	}
}

// fakeQMP answers the queries QEMU makes, from canned JSON.
type fakeQMP map[string]string

func (f fakeQMP) Execute(_ context.Context, cmd string, args, result any) error {
	key := cmd
	if a, ok := args.(map[string]any); ok && cmd == "qom-get" {
		key = fmt.Sprint(cmd, " ", a["path"])
	}
	s, ok := f[key]
	if !ok {
		return errors.New("CommandNotFound")
	}
	return json.Unmarshal([]byte(s), result)
}

func TestQEMU(t *testing.T) {
	q := fakeQMP{
		"query-cpus-fast":                 `[{"cpu-index":0},{"cpu-index":1}]`,
		"query-memory-size-summary":       `{"base-memory":2147483648}`,
		"query-block":                     `[{"device":"pflash0","qdev":""},{"device":"","qdev":"/machine/peripheral/vda"}]`,
		"qom-get /machine/peripheral/vda": `"virtio-blk-pci"`,
		"qom-get /machine/peripheral/sdb": `"scsi-hd"`,
		"human-monitor-command":           `"virtio-net-pci.0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ user.0: index=0,type=user,net=10.0.2.0\r\ne1000.1: index=0,type=nic,model=e1000,macaddr=52:54:00:AB:CD:EF\r\n"`,
	}
	m := QEMU(context.Background(), q, map[string]string{"vda": "/machine/peripheral/vda", "sdb": "/machine/peripheral/sdb", "x": ""})
	want := repo.Machine{Kind: "qemu", CPUs: 2, MemoryMiB: 2048, Firmware: "uefi",
		Controllers: map[string]string{"vda": "virtio", "sdb": "scsi"},
		NICs:        []repo.NIC{{MAC: "52:54:00:12:34:56", Model: "virtio-net-pci"}, {MAC: "52:54:00:ab:cd:ef", Model: "e1000"}}}
	if a, b := fmt.Sprintf("%+v", *m), fmt.Sprintf("%+v", want); a != b {
		t.Errorf("QEMU:\n%s\nwant\n%s", a, b)
	}
	if m := QEMU(context.Background(), fakeQMP{}, nil); m.CPUs != 0 || m.Firmware != "bios" {
		t.Errorf("a monitor answering nothing: %+v", m)
	}
}
