package ptable

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// disk makes an image of size bytes partitioned by sfdisk with script.
func disk(t *testing.T, size int64, script string) []byte {
	t.Helper()
	if _, err := exec.LookPath("sfdisk"); err != nil {
		t.Skip("sfdisk is not installed")
	}
	p := filepath.Join(t.TempDir(), "d.img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(p, size)
	c := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", p)
	c.Stdin = strings.NewReader(script)
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func layout(t *testing.T, tb *Table) string {
	var s []string
	for _, p := range tb.Partitions {
		s = append(s, fmt.Sprintf("%d:%d+%d:%s:%s:%v:%s", p.Number, p.Start/512, p.Size/512, p.Type, p.Name, p.Container, p.Problem))
	}
	return strings.Join(s, " ")
}

const gptScript = `label: gpt
label-id: 12345678-9ABC-DEF0-1234-56789ABCDEF0
start=2048, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI"
start=6144, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
`

func TestGPT(t *testing.T) {
	b := disk(t, 8<<20, gptScript)
	tb, err := Read(bytes.NewReader(b), int64(len(b)), 0)
	if err != nil || tb == nil {
		t.Fatalf("%v %v", tb, err)
	}
	want := "1:2048+4096:C12A7328-F81F-11D2-BA4B-00A0C93EC93B:EFI:false: 2:6144+8192:0FC63DAF-8483-4772-8E79-3D69D8477DE4:root:false:"
	if got := layout(t, tb); got != want || tb.Kind != GPT || tb.ID != "12345678-9ABC-DEF0-1234-56789ABCDEF0" || len(tb.Warnings) > 0 {
		t.Fatalf("got %s %s %v\nwant %s", tb.ID, got, tb.Warnings, want)
	}
	// A damaged primary header: the backup is used, with a warning.
	bad := append([]byte(nil), b...)
	bad[512+20] ^= 0xFF // inside the header, after its CRC field
	bad[512+24] ^= 0x01
	tb, _ = Read(bytes.NewReader(bad), int64(len(bad)), 0)
	if tb == nil || layout(t, tb) != want || len(tb.Warnings) == 0 || !strings.Contains(tb.Warnings[0], "primary") {
		t.Fatalf("damaged primary: %+v", tb)
	}
	// Both damaged: the table is unusable.
	bad[len(bad)-512+24] ^= 0x01
	tb, _ = Read(bytes.NewReader(bad), int64(len(bad)), 0)
	if tb == nil || !tb.Damaged() {
		t.Fatalf("both headers damaged: %+v", tb)
	}
	// A damaged entry array fails its CRC.
	bad = append([]byte(nil), b...)
	bad[1024+40] ^= 0x10
	tb, _ = Read(bytes.NewReader(bad), int64(len(bad)), 0)
	if tb == nil || layout(t, tb) != want || !strings.Contains(strings.Join(tb.Warnings, ";"), "CRC") {
		t.Fatalf("damaged primary entries: %+v", tb)
	}
	// Truncated (the disk shrank): the partition runs past the end.
	short := b[:4<<20]
	tb, _ = Read(bytes.NewReader(short), int64(len(short)), 0)
	if tb == nil || tb.Partitions[1].Problem == "" {
		t.Fatalf("truncated disk: %+v", tb)
	}
}

const mbrScript = `label: dos
label-id: 0xdeadbeef
start=2048, size=4096, type=83, bootable
start=6144, size=20480, type=5
start=8192, size=4096, type=7
start=14336, size=4096, type=82
`

func TestMBRWithLogicalPartitions(t *testing.T) {
	b := disk(t, 16<<20, mbrScript)
	tb, err := Read(bytes.NewReader(b), int64(len(b)), 0)
	if err != nil || tb == nil {
		t.Fatalf("%v %v", tb, err)
	}
	want := "1:2048+4096:0x83::false: 2:6144+20480:0x05::true: 5:8192+4096:0x07::false: 6:14336+4096:0x82::false:"
	if got := layout(t, tb); got != want || tb.Kind != MBR || tb.ID != "deadbeef" || !tb.Partitions[0].Bootable || len(tb.Warnings) > 0 {
		t.Fatalf("got %s %v\nwant %s", got, tb.Warnings, want)
	}
	// An EBR that links back to itself stops the chain with a warning.
	loop := append([]byte(nil), b...)
	ebr := 6144 * 512
	copy(loop[ebr+446+16+8:], []byte{0, 0, 0, 0}) // next EBR at offset 0 of the extended partition: itself
	tb, _ = Read(bytes.NewReader(loop), int64(len(loop)), 0)
	if tb == nil || !strings.Contains(strings.Join(tb.Warnings, ";"), "loops") {
		t.Fatalf("looping chain: %+v", tb)
	}
}

func TestNotATable(t *testing.T) {
	for name, b := range map[string][]byte{
		"zeros":  make([]byte, 1<<20),
		"short":  make([]byte, 100),
		"no sig": append(bytes.Repeat([]byte{0x80}, 510), 0, 0),
	} {
		if tb, err := Read(bytes.NewReader(b), int64(len(b)), 0); tb != nil || err != nil {
			t.Errorf("%s: %+v %v", name, tb, err)
		}
	}
}

// FuzzRead reads a partition table from arbitrary disk bytes: it must not
// panic, and every partition it reports lies within the disk.
func FuzzRead(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, ss := range []int{0, 512, 4096} {
			tb, err := Read(bytes.NewReader(b), int64(len(b)), ss)
			if err != nil || tb == nil {
				continue
			}
			for _, p := range tb.Partitions {
				if p.Start < 0 || p.Size < 0 || p.Start+p.Size > int64(len(b)) {
					t.Fatalf("partition %d [%d, +%d) outside a disk of %d bytes", p.Number, p.Start, p.Size, len(b))
				}
			}
		}
	})
}

// TestSeedImages keeps the fuzz seeds (small whole-disk images) current:
// SAUVE_UPDATE_SEEDS=1 go test -run TestSeedImages rewrites them.
func TestSeedImages(t *testing.T) {
	for name, script := range map[string]string{
		"gpt": "label: gpt\nstart=40, size=8, name=\"a\"\nstart=48, size=12\n",
		"mbr": "label: dos\nstart=1, size=8, type=83\nstart=9, size=40, type=5\nstart=10, size=8, type=7\nstart=20, size=8, type=82\n",
	} {
		p := filepath.Join("testdata", "fuzz", "FuzzRead", name)
		if os.Getenv("SAUVE_UPDATE_SEEDS") != "" {
			b := disk(t, 96*512, script)
			os.MkdirAll(filepath.Dir(p), 0o755)
			os.WriteFile(p, []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644)
		}
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.SplitN(string(raw), "\n", 3)
		var b string
		if len(lines) < 2 {
			t.Fatalf("%s: not a fuzz corpus file", p)
		}
		if _, err := fmt.Sscanf(strings.TrimSuffix(strings.TrimPrefix(lines[1], "[]byte("), ")"), "%q", &b); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		tb, err := Read(strings.NewReader(b), int64(len(b)), 0)
		if err != nil || tb == nil || len(tb.Partitions) < 2 {
			t.Fatalf("seed %s: %+v %v", name, tb, err)
		}
	}
}
