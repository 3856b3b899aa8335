package resize

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

func run(t *testing.T, stdin string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// makeDisk partitions a new file of size bytes with an sfdisk script and
// fills each partition with distinct bytes.
func makeDisk(t *testing.T, size int64, script string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	run(t, script, "sfdisk", "-q", path)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i, p := range sfdiskParts(t, path) {
		if p.Type == "5" || p.Type == "f" {
			continue // an extended partition: its EBRs live inside
		}
		b := bytes.Repeat([]byte{byte(0x11 * (i + 1))}, int(p.Size*512))
		if _, err := f.WriteAt(b, p.Start*512); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

type sfPart struct {
	Node        string
	Start, Size int64
	Type        string
}

func sfdiskParts(t *testing.T, path string) []sfPart {
	t.Helper()
	var v struct {
		PartitionTable struct {
			Partitions []sfPart
		}
	}
	if err := json.Unmarshal([]byte(run(t, "", "sfdisk", "-J", path)), &v); err != nil {
		t.Fatal(err)
	}
	return v.PartitionTable.Partitions
}

// sums returns the checksum of every non-extended partition's content.
func sums(t *testing.T, path string, parts []sfPart) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range parts {
		if p.Type == "5" || p.Type == "f" {
			continue
		}
		out = append(out, fmt.Sprintf("%x", sha256.Sum256(b[p.Start*512:(p.Start+p.Size)*512])))
	}
	return out
}

func grow(t *testing.T, path string, newSize int64, o Options) (*Result, error) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	old := fi.Size()
	if err := f.Truncate(newSize); err != nil {
		t.Fatal(err)
	}
	return Apply(f, old, newSize, o)
}

// sgdiskClean asserts sgdisk -v finds nothing wrong.
func sgdiskClean(t *testing.T, path string) {
	t.Helper()
	out := run(t, "", "sgdisk", "-v", path)
	if !strings.Contains(out, "No problems found") {
		t.Fatalf("sgdisk -v %s:\n%s", path, out)
	}
}

const mib = 1 << 20

func TestApply(t *testing.T) {
	needTools(t, "sfdisk", "sgdisk")
	tests := []struct {
		name     string
		script   string
		grow     bool
		newSize  int64
		wantLast int64 // sectors of the last partition after
		gpt      bool
	}{
		{"gpt keep", "label: gpt\n,4M\n,8M\n", false, 64 * mib, 8 * 2048, true},
		{"gpt grow", "label: gpt\n,4M\n,\n", true, 64 * mib, 64*2048 - 2048 - 4*2048 - 33, true},
		{"gpt grow not last entry", "label: gpt\n2048,4M,,,\n16384,4M\n10240,4M\n", true, 64 * mib, 64*2048 - 16384 - 33, true},
		{"gpt same size", "label: gpt\n,4M\n,\n", false, 20 * mib, 28672, true},
		{"mbr keep", "label: dos\n,4M\n,\n", false, 64 * mib, 20*2048 - 2048 - 4*2048, false},
		{"mbr grow primary", "label: dos\n,4M\n,\n", true, 64 * mib, 64*2048 - 2048 - 4*2048, false},
		{"mbr grow logical", "label: dos\n,4M\n,,E\n,4M\n,\n", true, 64 * mib, 64*2048 - (2048 + 4*2048 + 2048 + 4*2048 + 2048), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := makeDisk(t, 20*mib, tc.script)
			before := sfdiskParts(t, path)
			sumsBefore := sums(t, path, before)
			res, err := grow(t, path, tc.newSize, Options{GrowLastPartition: tc.grow})
			if err != nil {
				t.Fatal(err)
			}
			if fi, _ := os.Stat(path); fi.Size() != tc.newSize {
				t.Fatalf("size %d", fi.Size())
			}
			if tc.gpt {
				sgdiskClean(t, path)
			} else if out := run(t, "", "sfdisk", "--verify", path); !strings.Contains(out, "No errors detected") {
				t.Fatalf("sfdisk --verify:\n%s", out)
			}
			after := sfdiskParts(t, path)
			if len(after) != len(before) {
				t.Fatalf("partitions %v, were %v", after, before)
			}
			var last sfPart
			for i, p := range after {
				if p.Start != before[i].Start {
					t.Errorf("partition %s moved: %d -> %d", p.Node, before[i].Start, p.Start)
				}
				if p.Size < before[i].Size {
					t.Errorf("partition %s shrank", p.Node)
				}
				if p.Type != "5" && p.Type != "f" && p.Start+p.Size > last.Start+last.Size {
					last = p
				}
			}
			if last.Size != tc.wantLast {
				t.Errorf("last partition %s: %d sectors, want %d", last.Node, last.Size, tc.wantLast)
			}
			if (res.Grown != nil) != tc.grow {
				t.Errorf("grown %+v", res.Grown)
			}
			// What the partitions held is unchanged (the grown one's old
			// extent is what is compared).
			if got := sums(t, path, before); !equal(got, sumsBefore) {
				t.Error("partition contents changed")
			}
			// Applying again finds nothing to do.
			f, _ := os.Open(path)
			defer f.Close()
			again, err := Plan(f, tc.newSize, tc.newSize, Options{})
			if err != nil || len(again.Patches) != 0 {
				t.Errorf("second plan: %v, %d patches", err, len(again.Patches))
			}
		})
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// corrupt flips one byte of the file.
func corrupt(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	f.ReadAt(b, off)
	b[0] ^= 0xFF
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestRefuse(t *testing.T) {
	needTools(t, "sfdisk")
	tests := []struct {
		name    string
		script  string
		damage  int64 // byte to flip, 0 for none
		grow    bool
		newSize int64
		want    string
	}{
		{"gpt header crc", "label: gpt\n,4M\n", 512 + 40, false, 64 * mib, "primary GPT header fails its CRC"},
		{"gpt entries crc", "label: gpt\n,4M\n", 1024 + 33, false, 64 * mib, "entry array fails its CRC"},
		{"smaller", "label: gpt\n,4M\n", 0, false, 10 * mib, "smaller than the disk"},
		{"mbr over 2TiB", "label: dos\n,4M\n", 0, true, 3 << 40, "cannot address"},
		{"no table", "", 0, true, 64 * mib, "no partition table"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var path string
			if tc.script == "" {
				path = filepath.Join(t.TempDir(), "disk.img")
				os.WriteFile(path, make([]byte, 20*mib), 0o600)
			} else {
				path = makeDisk(t, 20*mib, tc.script)
			}
			if tc.damage != 0 {
				corrupt(t, path, tc.damage)
			}
			before, _ := os.ReadFile(path)
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			_, err = Apply(f, 20*mib, tc.newSize, Options{GrowLastPartition: tc.grow})
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want a refusal saying %q", err, tc.want)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Error("a refused plan wrote to the disk")
			}
		})
	}
}

// TestSector4096 patches a GPT made on a loop device with 4096-byte
// sectors and checks it there.
func TestSector4096(t *testing.T) {
	needTools(t, "sfdisk", "sgdisk", "losetup")
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	path := filepath.Join(t.TempDir(), "disk.img")
	os.WriteFile(path, nil, 0o600)
	os.Truncate(path, 20*mib)
	attach := func() string {
		dev := strings.TrimSpace(run(t, "", "losetup", "-b", "4096", "-f", "--show", path))
		t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
		return dev
	}
	dev := attach()
	run(t, "label: gpt\n,4M\n,\n", "sfdisk", "-q", dev)
	run(t, "", "losetup", "-d", dev)
	res, err := grow(t, path, 64*mib, Options{GrowLastPartition: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.SectorSize != 4096 || res.Grown == nil || res.Grown.Number != 2 {
		t.Fatalf("result %+v", res)
	}
	dev = attach()
	if out := run(t, "", "sgdisk", "-v", dev); !strings.Contains(out, "No problems found") {
		t.Fatalf("sgdisk -v:\n%s", out)
	}
	parts := sfdiskParts(t, dev)
	// 64 MiB of 4 KiB sectors: the backup array (4 sectors) and header
	// (1) at the end.
	if n := len(parts); n != 2 || parts[1].Start+parts[1].Size != 64*256-5 {
		t.Fatalf("partitions %+v", parts)
	}
}

func TestPutCHS(t *testing.T) {
	tests := []struct {
		lba  uint64
		want [3]byte
	}{
		{0, [3]byte{0, 1, 0}},
		{2047, [3]byte{32, 32, 0}},
		{255*63*1024 - 1, [3]byte{254, 63 | 3<<6, 255}},
		{255 * 63 * 1024, [3]byte{254, 0xFF, 0xFF}},
	}
	for _, tc := range tests {
		var b [3]byte
		putCHS(b[:], tc.lba)
		if b != tc.want {
			t.Errorf("putCHS(%d) = %v, want %v", tc.lba, b, tc.want)
		}
	}
}

// TestUnpatchedComplains makes sure sgdiskClean can fail: a GPT disk
// copied onto a larger one, left as it is, is a defect sgdisk reports.
func TestUnpatchedComplains(t *testing.T) {
	needTools(t, "sfdisk", "sgdisk")
	path := makeDisk(t, 20*mib, "label: gpt\n,4M\n")
	os.Truncate(path, 64*mib)
	if out := run(t, "", "sgdisk", "-v", path); strings.Contains(out, "No problems found") {
		t.Fatalf("sgdisk -v finds an unpatched larger disk clean:\n%s", out)
	}
}
