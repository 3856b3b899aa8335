package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
)

// writingBootCode is a real-mode MBR program that uses the disk as a
// booted system would: it reads the sector at LBA R (a line the backup
// holds) to 0000:8000 with int 13h AH=42h, writes it back at LBA W with
// AH=43h, reads LBA W again to 0000:8200 and prints that copy on COM1.
// The line on the serial port thus went through a write and a read of
// the disk; "IO-ERROR" is printed if the BIOS failed any of them.
//
//	cli; xor ax,ax; mov ds,ax; mov es,ax; mov ss,ax; mov sp,0x7c00; sti
//	mov [0x600],dl                       ; the boot drive, for each call
//	mov si,dapr1; mov dl,[0x600]; mov ax,0x4200; int 13h; jc fail
//	mov si,dapw;  mov dl,[0x600]; mov ax,0x4300; int 13h; jc fail
//	mov si,dapr2; mov dl,[0x600]; mov ax,0x4200; int 13h; jc fail
//	mov si,0x8200; jmp print
//	fail: mov si,err
//	print: cli; mov dx,0x3f8; loop: lodsb; test al,al; jz halt; out dx,al; jmp loop
//	halt: cli; hlt; jmp halt
//	dapr1: 10 00 01 00 0000:8000 LBA R;  dapw: ... 0000:8000 LBA W;  dapr2: ... 0000:8200 LBA W
//	err: "IO-ERROR\r\n\0"
const writingBootCode = "fa31c08ed88ec08ed0bc007cfb88160006be537c8a160006b80042cd137221be637c8a160006b80043cd137213be737c8a160006b80042cd137205be0082eb03be837cfabaf803ac84c07403eeebf8faf4ebfc" +
	"1000010000800000" + "0000000000000000" + "1000010000800000" + "0000000000000000" + "1000010000820000" + "0000000000000000" +
	"494f2d4552524f520d0a00"

// The DAPs' LBA fields in writingBootCode.
const dapR1, dapW, dapR2 = 83 + 8, 99 + 8, 115 + 8

// writingBootDisk writes an 8 MiB disk booting writingBootCode, with line
// at LBA r; it returns the LBA the program writes to (zeros in the image).
func writingBootDisk(t *testing.T, path, line string) int64 {
	t.Helper()
	code, err := hex.DecodeString(writingBootCode)
	if err != nil {
		t.Fatal(err)
	}
	const r, w = 3<<20/512 + 7, 6<<20/512 + 3
	binary.LittleEndian.PutUint64(code[dapR1:], r)
	binary.LittleEndian.PutUint64(code[dapW:], w)
	binary.LittleEndian.PutUint64(code[dapR2:], w)
	mbr := make([]byte, 512)
	copy(mbr, code)
	mbr[510], mbr[511] = 0x55, 0xAA
	img := make([]byte, 8<<20)
	copy(img, mbr)
	copy(img[r*512:], line+"\r\n\x00")
	copy(img[1<<20:], randomBytes(300000))
	writeFile(t, path, img)
	return w
}

// repoState is a digest of every file of a repository folder but its
// locks, to tell that nothing in it changed.
func repoState(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.Contains(p, "/locks/") {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		lines = append(lines, fmt.Sprintf("%s %x", strings.TrimPrefix(p, dir), sha256.Sum256(b)))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// TestServeNBDWritableBoot boots QEMU from a writable export of a
// backed-up disk: the guest writes to the disk and reads its write back;
// the write lands in the overlay, survives a restart of the server with
// the same --overlay, and the repository is untouched.
func TestServeNBDWritableBoot(t *testing.T) {
	needTools(t, "qemu-system-x86_64", "nbdcopy")
	e := newEnv(t)
	img := e.path("boot.img")
	line := "SAUVE INSTANT BOOT " + hex.EncodeToString(randomBytes(4))
	lba := writingBootDisk(t, img, line)
	b := e.backup(img)
	before := repoState(t, e.repo)

	dir, err := os.MkdirTemp("", "sauve-nbdw")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock, ov := filepath.Join(dir, "s.sock"), filepath.Join(dir, "vm.overlay")
	serve := func(name string) *daemon {
		return startDaemon(t, "sauve serve nbd --writable", e.cmd(nil, "serve", "nbd", b.ShortID, "--writable", "--overlay", ov, "--listen", "unix:"+sock),
			e.path(name), syscall.SIGINT, func() bool { _, err := os.Stat(sock); return err == nil })
	}
	d := serve("serve1.log")
	bootDrive(t, "file=nbd:unix:"+sock+":exportname="+b.Disk+",format=raw,if=ide", false, line)
	sector := func() []byte {
		t.Helper()
		out := e.path("copy.img")
		os.Remove(out)
		if o, err := exec.Command("nbdcopy", "nbd+unix:///"+b.Disk+"?socket="+sock, out).CombinedOutput(); err != nil {
			t.Fatalf("nbdcopy: %v\n%s", err, o)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		return got[lba*512 : lba*512+512]
	}
	if got := sector(); !bytes.HasPrefix(got, []byte(line+"\r\n")) {
		t.Fatalf("the guest's write is not on the export: sector %d holds %q\n%s", lba, got[:40], d.logText())
	}
	d.stop(t, syscall.SIGINT)
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("serve --writable exited %d:\n%s", code, d.logText())
	}
	if log := d.logText(); !strings.Contains(log, "writes go to the overlay "+ov) || !strings.Contains(log, "never written") {
		t.Errorf("the server does not say where writes go:\n%s", log)
	}
	if fi, err := os.Stat(ov); err != nil || fi.Size() == 0 {
		t.Fatalf("the overlay is not kept: %v", err)
	}

	// The repository holds the disk as it was backed up.
	if after := repoState(t, e.repo); after != before {
		t.Errorf("serving writable changed the repository:\nbefore\n%s\nafter\n%s", before, after)
	}
	e.ok("check", "--read-data")
	restored := e.path("restored.img")
	e.ok("restore", b.ShortID, restored)
	if got, _ := os.ReadFile(restored); !bytes.Equal(got[lba*512:lba*512+512], make([]byte, 512)) {
		t.Error("the restore holds the guest's write")
	}

	// Served again from the same overlay, the write is still there.
	d = serve("serve2.log")
	if got := sector(); !bytes.HasPrefix(got, []byte(line+"\r\n")) {
		t.Fatalf("after a restart, sector %d holds %q\n%s", lba, got[:40], d.logText())
	}
	if log := d.logText(); !strings.Contains(log, "written before") {
		t.Errorf("the restarted server does not say the overlay holds writes:\n%s", log)
	}
	d.stop(t, syscall.SIGINT)

	// An overlay of another snapshot is refused, and left as it was.
	other := e.path("other.img")
	writeFile(t, other, randomBytes(1<<20))
	b2 := e.backup(other)
	st, _ := os.ReadFile(ov)
	r := e.run("serve", "nbd", b2.ShortID, "--writable", "--overlay", ov, "--listen", "unix:"+sock)
	if r.code == 0 || !strings.Contains(r.stderr, "belongs to "+b.Snapshot) {
		t.Errorf("an overlay of another snapshot: exit %d, stderr %q", r.code, r.stderr)
	}
	if now, _ := os.ReadFile(ov); !bytes.Equal(now, st) {
		t.Error("a refused overlay was changed")
	}
	if r := e.run("serve", "nbd", b.ShortID, "--overlay", ov); r.code != 2 || !strings.Contains(r.stderr, "--overlay goes with --writable") {
		t.Errorf("--overlay without --writable: exit %d, stderr %q", r.code, r.stderr)
	}
}

// TestServeNBDWritableTemporary writes through a temporary overlay with
// qemu-io, over a partition's export too: the writes read back, and the
// overlay is gone when the server stops.
func TestServeNBDWritableTemporary(t *testing.T) {
	needTools(t, "qemu-io", "sfdisk")
	e := newEnv(t)
	img := e.path("disk.img")
	writeFile(t, img, randomBytes(8<<20))
	sfdisk(t, img, "label: dos\nstart=2048, size=8192, type=83\n")
	b := e.backup(img)
	tmp := t.TempDir()
	e.setenv("TMPDIR", tmp)
	dir, err := os.MkdirTemp("", "sauve-nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	d := startDaemon(t, "sauve serve nbd --writable", e.cmd(nil, "serve", "nbd", "latest", "--writable", "--listen", "unix:"+sock),
		e.path("serve.log"), syscall.SIGTERM, func() bool { _, err := os.Stat(sock); return err == nil })
	qio := func(export string, cmds ...string) string {
		t.Helper()
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		args = append(args, "nbd+unix:///"+export+"?socket="+sock)
		out, err := exec.Command("qemu-io", args...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "failed") {
			t.Fatalf("qemu-io %v: %v\n%s\n%s", cmds, err, out, d.logText())
		}
		return string(out)
	}
	qio(b.Disk, "write -P 0xab 4096 8192", "flush", "write -z 65536 131072")
	qio(b.Disk, "read -P 0xab 4096 8192", "read -P 0 65536 131072")
	// Partition 1 starts at 1 MiB: a write there is seen on the disk.
	qio(b.Disk+":1", "write -P 0xcd 512 1024")
	qio(b.Disk, "read -P 0xcd 1049088 1024")
	ents, _ := os.ReadDir(tmp)
	if len(ents) != 1 || !strings.HasPrefix(ents[0].Name(), "sauve-overlay-") {
		t.Fatalf("temporary folder holds %v, want one overlay", ents)
	}
	d.stop(t, syscall.SIGTERM)
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("the temporary overlay is left: %v", ents)
	}
	if log := d.logText(); !strings.Contains(log, "temporary overlay") {
		t.Errorf("the server does not say the overlay is temporary:\n%s", log)
	}
}
