package ptable

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
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

// TestProblemEntriesClipped: an entry already found wrong (a logical
// partition outside its extended one, a GPT entry outside the usable
// sectors) that also runs past the disk is clipped to the disk like any
// other. Found by FuzzRead (testdata/fuzz/FuzzRead/321ff8a100d2bde9: a
// logical partition at 385 GiB of a 3 MiB disk).
func TestProblemEntriesClipped(t *testing.T) {
	b := disk(t, 16<<20, mbrScript)
	ebr := 6144 * 512
	copy(b[ebr+446+8:], []byte{0, 0, 0, 0x40}) // first logical partition 512 GiB into its extended one
	tb, err := Read(bytes.NewReader(b), int64(len(b)), 0)
	if err != nil || tb == nil {
		t.Fatalf("%v %v", tb, err)
	}
	p := tb.Partitions[2]
	if p.Number != 5 || p.Problem != "lies outside its extended partition" || p.Start != int64(len(b)) || p.Size != 0 {
		t.Fatalf("logical partition past the disk: %+v", p)
	}
	parts := []Partition{
		{Number: 1, Start: 1 << 20, Size: 1 << 40, Problem: "lies outside the usable sectors 34-100 the GPT header declares"},
		{Number: 2, Start: 1 << 40, Size: 1 << 20, Problem: "lies outside its extended partition"},
		{Number: 3, Start: 2 << 20, Size: 1 << 40},
	}
	checkLayout(parts, 4<<20)
	for i, want := range []Partition{
		{Number: 1, Start: 1 << 20, Size: 3 << 20, Problem: parts[0].Problem},
		{Number: 2, Start: 4 << 20, Size: 0, Problem: parts[1].Problem},
		{Number: 3, Start: 2 << 20, Size: 2 << 20, Problem: "runs past the end of the disk"},
	} {
		if parts[i] != want {
			t.Errorf("entry %d: %+v, want %+v", i+1, parts[i], want)
		}
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

// TestMain bounds the fuzzer's minimizing (see package fuzzimg).
func TestMain(m *testing.M) { fuzzimg.Main(m) }

// FuzzRead reads a partition table from a disk image in the encoding of
// package fuzzimg (seeds hold only the sectors a table lives in, so they
// stay small however large the disk they describe): it must not panic,
// every partition it reports lies within the disk, and those it trusts
// (no Problem) do not overlap, except logical partitions inside their
// extended one. Reads past 1 MiB fail, so that entry arrays that a header
// claims large stay cheap.
func FuzzRead(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, ss := range []int{0, 512, 4096} {
			img := fuzzimg.Decode(in, 1<<32-1, 1<<20)
			size := img.Size()
			tb, err := Read(img, size, ss)
			if err != nil || tb == nil {
				continue
			}
			numbers := map[int]bool{}
			for i, p := range tb.Partitions {
				if p.Start < 0 || p.Size < 0 || p.Start+p.Size > size {
					t.Fatalf("partition %d [%d, +%d) outside a disk of %d bytes", p.Number, p.Start, p.Size, size)
				}
				if numbers[p.Number] {
					t.Fatalf("two partitions numbered %d", p.Number)
				}
				numbers[p.Number] = true
				for _, q := range tb.Partitions[i+1:] {
					if p.Problem == "" && q.Problem == "" && p.Size > 0 && q.Size > 0 && p.Start < q.End() && q.Start < p.End() &&
						(p.Container == q.Container || !contains(&p, &q)) {
						t.Fatalf("partitions %d [%d, +%d) and %d [%d, +%d) overlap", p.Number, p.Start, p.Size, q.Number, q.Start, q.Size)
					}
				}
			}
		}
	})
}

// seedDisks are the disks the fuzz seeds are made from.
var seedDisks = []struct {
	name   string
	size   int64
	script string
	parts  int
}{
	{"gpt", 8 << 20, "label: gpt\nfirst-lba: 34\nstart=40, size=8, name=\"a\"\nstart=48, size=12\nstart=2048, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n", 3},
	{"mbr", 8 << 20, "label: dos\nstart=1, size=8, type=83, bootable\nstart=9, size=40, type=5\nstart=10, size=8, type=7\nstart=20, size=8, type=82\nstart=2048, type=c\n", 5},
}

// TestSeedImages keeps the fuzz seeds current: SAUVE_UPDATE_SEEDS=1 go
// test -run TestSeedImages rewrites them from disks made by sfdisk,
// keeping only what reading their tables reads.
func TestSeedImages(t *testing.T) {
	for _, d := range seedDisks {
		p := filepath.Join("testdata", "fuzz", "FuzzRead", d.name)
		if os.Getenv("SAUVE_UPDATE_SEEDS") != "" {
			b := disk(t, d.size, d.script)
			tr := &fuzzimg.Trace{R: bytes.NewReader(b)}
			for _, ss := range []int{0, 512, 4096} {
				if _, err := Read(tr, int64(len(b)), ss); err != nil {
					t.Fatal(err)
				}
			}
			os.MkdirAll(filepath.Dir(p), 0o755)
			os.WriteFile(p, []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", fuzzimg.Encode(tr.Keep(b)))), 0o644)
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
		img := fuzzimg.Decode([]byte(b), 1<<32-1, 1<<20)
		tb, err := Read(img, img.Size(), 0)
		if err != nil || tb == nil || len(tb.Partitions) != d.parts || len(tb.Warnings) > 0 || img.Size() != d.size {
			t.Fatalf("seed %s (%d bytes): %+v %v", d.name, len(b), tb, err)
		}
		t.Logf("seed %s: %d bytes", d.name, len(b))
	}
}
