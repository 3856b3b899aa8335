package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/qmp"
)

// liveVM is a running qemu-system-x86_64 (TCG, no machine: it only holds
// its drives) with a QMP socket for sauve and a second monitor through
// which the test writes to the drives as a guest would.
type liveVM struct {
	t          *testing.T
	sock, mon  string
	qcow2, raw string
	cmd        *exec.Cmd
	writer     *qmp.Client
}

func startLiveVM(t *testing.T, dir string, extra ...string) *liveVM {
	t.Helper()
	for _, p := range []string{"qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed (Debian packages qemu-system-x86, qemu-utils)", p)
		}
	}
	vm := &liveVM{t: t, sock: filepath.Join(dir, "vm.qmp"), mon: filepath.Join(dir, "mon.qmp"),
		qcow2: filepath.Join(dir, "d0.qcow2"), raw: filepath.Join(dir, "d1.raw")}
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", vm.qcow2, "16M")
	sh(t, "qemu-img", "create", "-q", "-f", "raw", vm.raw, "4M")
	vm.cmd = exec.Command("qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
		"-name", "vm1", "-uuid", "7a1c9a52-3b1e-4c55-9d0e-2a7b8c9d0e1f",
		"-qmp", "unix:"+vm.sock+",server=on,wait=off", "-qmp", "unix:"+vm.mon+",server=on,wait=off",
		"-drive", "if=none,id=drive0,file="+vm.qcow2+",format=qcow2",
		"-drive", "if=none,id=drive1,file="+vm.raw+",format=raw")
	vm.cmd.Args = append(vm.cmd.Args, extra...)
	if err := vm.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.cmd.Process.Kill(); vm.cmd.Wait() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		c, err := qmp.Dial(ctx, vm.mon)
		if err == nil {
			vm.writer = c
			t.Cleanup(func() { c.Close() })
			return vm
		}
		if ctx.Err() != nil {
			t.Fatalf("QEMU's monitor: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// write writes pattern byte pat at [off, off+n) of a drive, as the guest.
func (vm *liveVM) write(drive string, pat byte, off, n int64) {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out string
	cmd := fmt.Sprintf("qemu-io %s \"write -P %d %d %d\"", drive, pat, off, n)
	if err := vm.writer.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil || strings.Contains(out, "error") {
		vm.t.Fatalf("%s: %v %s", cmd, err, out)
	}
}

// bitmaps lists the dirty bitmaps of drive0's node.
func (vm *liveVM) bitmaps() []string {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var nodes []struct {
		NodeName    string `json:"node-name"`
		DirtyBitmap []struct {
			Name string `json:"name"`
		} `json:"dirty-bitmaps"`
	}
	if err := vm.writer.Execute(ctx, "query-named-block-nodes", nil, &nodes); err != nil {
		vm.t.Fatal(err)
	}
	var out []string
	for _, n := range nodes {
		if strings.Contains(n.NodeName, "sauve") {
			out = append(out, "node "+n.NodeName)
		}
		for _, b := range n.DirtyBitmap {
			out = append(out, b.Name)
		}
	}
	return out
}

type qemuBackupOut struct {
	Snapshot string `json:"snapshot"`
	Host     string `json:"host"`
	Disks    []struct {
		Disk      string `json:"disk"`
		Source    string `json:"source"`
		Size      int64  `json:"size"`
		BytesRead int64  `json:"bytes_read"`
		Unchanged int64  `json:"bytes_unchanged"`
		Base      string `json:"base"`
		FullRead  string `json:"full_read"`
		Copy      string `json:"point_in_time_copy"`
	} `json:"disks"`
}

// A running VM's drives back up at one instant through fleecing; the
// next backup reads only what its dirty bitmap marks on the qcow2 drive
// (the raw one is read in full, and the output says why); every snapshot
// restores byte-exact, and nothing of sauve's is left in the VM but its
// newest bitmap.
func TestBackupRunningQEMU(t *testing.T) {
	e := newEnv(t)
	vm := startLiveVM(t, e.dir)
	d0, d1 := make([]byte, 16<<20), make([]byte, 4<<20)
	put := func(buf []byte, drive string, pat byte, off, n int64) {
		vm.write(drive, pat, off, n)
		copy(buf[off:off+n], bytes.Repeat([]byte{pat}, int(n)))
	}
	put(d0, "drive0", 1, 0, 8<<20)
	put(d1, "drive1", 2, 1<<20, 1<<20)

	var first qemuBackupOut
	e.okJSON(&first, "backup", "qemu:"+vm.sock)
	if first.Host != "vm1" || len(first.Disks) != 2 || first.Disks[0].Disk != "drive0" || first.Disks[0].Copy != "qemu" {
		t.Fatalf("first backup: %+v", first)
	}
	if want := "qemu:7a1c9a52-3b1e-4c55-9d0e-2a7b8c9d0e1f/drive0"; first.Disks[0].Source != want {
		t.Errorf("source %q, want %q (the VM's UUID, not its socket)", first.Disks[0].Source, want)
	}
	restore := func(id, disk string, want []byte) {
		t.Helper()
		out := e.path(id + "-" + disk)
		e.ok("restore", id, "--disk", disk, out)
		got, err := os.ReadFile(out)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("drive %s of %s does not restore byte-exact (%v)", disk, id, err)
		}
	}
	restore(first.Snapshot[:8], "drive0", d0)
	restore(first.Snapshot[:8], "drive1", d1)

	// 2 x 64 KiB written: the next backup reads about two chunks of drive0.
	put(d0, "drive0", 3, 1<<20, 64<<10)
	put(d0, "drive0", 4, 12<<20, 64<<10)
	var second qemuBackupOut
	e.okJSON(&second, "backup", "qemu:"+vm.sock)
	q := second.Disks[0]
	if q.Base != first.Snapshot || q.BytesRead > 2<<20 || q.Unchanged < 6<<20 {
		t.Errorf("incremental drive0: read %d, unchanged %d, base %q (want %s)", q.BytesRead, q.Unchanged, q.Base, first.Snapshot[:8])
	}
	if r := second.Disks[1]; !strings.Contains(r.FullRead, "raw") {
		t.Errorf("raw drive1 read in full without saying why: %+v", r)
	}
	restore(second.Snapshot[:8], "drive0", d0)
	restore(second.Snapshot[:8], "drive1", d1)
	left := vm.bitmaps()
	if len(left) != 1 || !strings.HasPrefix(left[0], "sauve-") {
		t.Errorf("left in the VM: %v (want one sauve bitmap)", left)
	}
	e.fail([]string{"no drive", "drive9"}, "backup", "qemu:"+vm.sock, "--drive", "drive9")
	e.fail([]string{"nothing.sock", "no such file"}, "backup", "qemu:"+e.path("nothing.sock"))
	ln, err := net.Listen("unix", e.path("ssh.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n"))
			c.Close()
		}
	}()
	e.fail([]string{"not a QEMU monitor"}, "backup", "qemu:"+e.path("ssh.sock"))
	if n := len(vm.bitmaps()); n != 1 {
		t.Errorf("a refused backup changed the VM's bitmaps: %v", vm.bitmaps())
	}
	var list []json.RawMessage
	e.okJSON(&list, "snapshots", "--host", "vm1")
	if len(list) != 2 {
		t.Errorf("%d snapshots of vm1", len(list))
	}
}

// TestBackupRecordsMachine: a VM backed up through its monitor is
// recorded with what it is made of (CPUs, memory, controllers, network
// cards), and an OVA exported from the snapshot defines that machine.
func TestBackupRecordsMachine(t *testing.T) {
	e := newEnv(t)
	const mac = "52:54:00:12:34:56"
	vm := startLiveVM(t, e.dir, "-machine", "pc", "-smp", "2", "-m", "256", "-S",
		"-nic", "user,model=e1000,mac="+mac, "-device", "virtio-blk-pci,drive=drive0,id=vda")
	var b qemuBackupOut
	e.okJSON(&b, "backup", "qemu:"+vm.sock)
	var sn struct {
		Machine *struct {
			Kind        string
			CPUs        int   `json:"cpus"`
			MemoryMiB   int64 `json:"memory_mib"`
			Firmware    string
			Controllers map[string]string
			NICs        []struct{ MAC, Model string } `json:"nics"`
		}
	}
	e.okJSON(&sn, "show", b.Snapshot[:8])
	m := sn.Machine
	if m == nil || m.Kind != "qemu" || m.CPUs != 2 || m.MemoryMiB != 256 || m.Firmware != "bios" ||
		m.Controllers["drive0"] != "virtio" || len(m.NICs) != 1 || m.NICs[0].MAC != mac || m.NICs[0].Model != "e1000" {
		t.Fatalf("the snapshot's machine: %+v", m)
	}
	if out := e.ok("show", b.Snapshot[:8]); !strings.Contains(out, "machine (qemu): 2 CPUs, 256.0 MiB memory, BIOS, NIC "+mac+" e1000") {
		t.Errorf("show does not describe the machine:\n%s", out)
	}
	// The OVA's descriptor has the machine's CPUs, memory and NIC.
	ova := e.path("vm.ova")
	e.ok("export", b.Snapshot[:8], "--disk", "drive0", ova)
	desc := ovfOf(t, ova)
	for dec := xml.NewDecoder(strings.NewReader(desc)); ; {
		if _, err := dec.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("the OVF is not well-formed XML: %v\n%s", err, desc)
		}
	}
	for _, want := range []string{"<rasd:VirtualQuantity>2</rasd:VirtualQuantity>", "<rasd:VirtualQuantity>256</rasd:VirtualQuantity>",
		"<rasd:Address>" + mac + "</rasd:Address>", "<rasd:ResourceSubType>E1000</rasd:ResourceSubType>"} {
		if !strings.Contains(desc, want) {
			t.Errorf("the OVF lacks %s:\n%s", want, desc)
		}
	}
}

// ovfOf returns the OVF descriptor inside an OVA.
func ovfOf(t *testing.T, ova string) string {
	t.Helper()
	f, err := os.Open(ova)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("no .ovf in %s: %v", ova, err)
		}
		if strings.HasSuffix(h.Name, ".ovf") {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
	}
}
