package main

// End-to-end tests of export, convert and import of VM disk formats,
// checked by independent readers: qemu-img (check, info, compare) and
// qemu-io from Debian's qemu-utils, GNU tar, and qemu-system-x86_64
// booting the converted disks.

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// variant is one output format.
type variant struct {
	name, format, sub, ext, qemu string
	checks                       bool // qemu-img check supports it
}

var variants = []variant{
	{"raw", "raw", "", "img", "raw", false},
	{"qcow2", "qcow2", "", "qcow2", "qcow2", true},
	{"vmdk-sparse", "vmdk", "monolithicSparse", "vmdk", "vmdk", true},
	{"vmdk-stream", "vmdk", "streamOptimized", "vmdk", "vmdk", true},
	{"vhd-dynamic", "vhd", "dynamic", "vhd", "vpc", false},
	{"vhd-fixed", "vhd", "fixed", "vhd", "vpc", false},
	{"vhdx", "vhdx", "", "vhdx", "vhdx", true},
	{"vdi-dynamic", "vdi", "dynamic", "vdi", "vdi", true},
	{"vdi-fixed", "vdi", "fixed", "vdi", "vdi", true},
}

func (v variant) args() []string {
	a := []string{"--format", v.format}
	if v.sub != "" {
		a = append(a, "--subformat", v.sub)
	}
	return a
}

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Fatalf("%s is not installed: it comes with the Debian packages in .ci/packages (bash .ci/run installs them)", name)
	}
}

// qemuImg runs qemu-img and returns its output and exit code.
func qemuImg(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return string(out), ee.ExitCode()
		}
		t.Fatalf("qemu-img %v: %v", args, err)
	}
	return string(out), 0
}

type qemuInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	Specific    struct {
		Data struct {
			CreateType string `json:"create-type"`
		} `json:"data"`
	} `json:"format-specific"`
}

// checkImage has qemu-img confirm an image: its format and virtual size,
// no errors (for formats qemu-img can check) and, when src is given,
// contents identical to the raw image src.
func checkImage(t *testing.T, img string, v variant, size int64, src string) {
	t.Helper()
	out, code := qemuImg(t, "info", "--output=json", "-f", v.qemu, img)
	if code != 0 {
		t.Fatalf("qemu-img info %s: exit %d\n%s", img, code, out)
	}
	var info qemuInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", img, err, out)
	}
	// qemu sees every disk as whole 512-byte sectors (a raw file of odd
	// size included).
	if info.Format != v.qemu || info.VirtualSize != round512(size) {
		t.Fatalf("qemu-img info %s: format %s, virtual size %d; want %s, %d", img, info.Format, info.VirtualSize, v.qemu, size)
	}
	if v.sub == "streamOptimized" && info.Specific.Data.CreateType != "streamOptimized" {
		t.Fatalf("qemu-img info %s: create type %q", img, info.Specific.Data.CreateType)
	}
	if v.checks {
		out, code := qemuImg(t, "check", "-f", v.qemu, img)
		if code != 0 || !strings.Contains(out, "No errors were found") {
			t.Fatalf("qemu-img check %s: exit %d\n%s", img, code, out)
		}
	}
	if src != "" {
		out, code := qemuImg(t, "compare", "-f", "raw", "-F", v.qemu, src, img)
		if code != 0 {
			t.Fatalf("qemu-img compare %s %s: exit %d\n%s", src, img, code, out)
		}
	}
}

func round512(n int64) int64 { return (n + 511) / 512 * 512 }

// testImages writes the source images: random, sparse and mixed, with
// sizes that are no multiple of any cluster, grain or block size.
func testImages(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	imgs := map[string]int64{}
	mk := func(name string, size int64, parts map[int64][]byte) {
		p := filepath.Join(dir, name+".raw")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		for off, b := range parts {
			if _, err := f.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
		}
		f.Close()
		imgs[name] = size
	}
	const mib = 1 << 20
	mk("random", 5*mib+1536, map[int64][]byte{0: randomBytes(5*mib + 1536)})
	mk("sparse", 9*mib+3584, map[int64][]byte{
		0: randomBytes(4096), mib + 7: randomBytes(100), 3*mib - 100: randomBytes(64<<10 + 1),
		9*mib + 3584 - 512: randomBytes(512),
	})
	mk("mixed", 11*mib+5*512, map[int64][]byte{
		0: textBytes(1, 2*mib+333), 3 * mib: randomBytes(mib + 4095), 6*mib + 512: textBytes(2, 70000),
		8 * mib: append(make([]byte, 8192), randomBytes(3000)...), 11*mib + 4*512: randomBytes(512),
	})
	mk("odd", 1000001, map[int64][]byte{0: randomBytes(1000001)})
	return imgs
}

type convertOut struct {
	Output       string `json:"output"`
	Format       string `json:"format"`
	Subformat    string `json:"subformat"`
	VirtualSize  int64  `json:"virtual_size"`
	FileSize     int64  `json:"file_size"`
	Allocated    int64  `json:"allocated_bytes"`
	DataBytes    int64  `json:"data_bytes"`
	BytesRead    int64  `json:"bytes_read"`
	SourceFormat string `json:"source_format"`
	Snapshot     string `json:"snapshot"`
}

func TestConvertFormatsQemu(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newBareEnv(t)
	imgs := testImages(t, e.dir)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			e := e.sub(t)
			for name, size := range imgs {
				src := e.path(name + ".raw")
				out := e.path(name + "-" + v.name + "." + v.ext)
				var res convertOut
				e.okJSON(&res, append([]string{"convert", src, out}, v.args()...)...)
				want := round512(size)
				if v.format == "raw" {
					want = size
				}
				if res.VirtualSize != want || res.Format != v.format {
					t.Fatalf("%s: convert reported %+v", name, res)
				}
				checkImage(t, out, v, want, src)
				// sauve reads its own output back to the same bytes.
				back := out + ".back"
				e.ok("convert", out, back, "--format", "raw")
				b1, _ := os.ReadFile(src)
				b2, _ := os.ReadFile(back)
				if !bytes.Equal(b1, b2[:len(b1)]) || !isZero(b2[len(b1):]) {
					t.Fatalf("%s: %s read back differs from the source", name, v.name)
				}
			}
		})
	}
}

// sub returns the environment for a subtest, so failures are reported
// (and stop) the subtest's goroutine.
func (e *env) sub(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

func isZero(b []byte) bool { return len(bytes.Trim(b, "\x00")) == 0 }

// TestConvertHuge converts a 2 TiB sparse disk holding a few bytes: the
// outputs stay small and qemu reads the bytes where they belong.
func TestConvertHuge(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "qemu-io")
	e := newBareEnv(t)
	const tib = int64(1) << 40
	islands := map[int64]byte{1000000: 0xa1, tib + 12345: 0xb2, 2*tib - 4096: 0xc3}
	mk := func(size int64) string {
		p := e.path(fmt.Sprintf("huge-%d.raw", size))
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(size)
		for off, c := range islands {
			if off+4096 <= size {
				f.WriteAt(bytes.Repeat([]byte{c}, 4096), off)
			}
		}
		f.Close()
		return p
	}
	src := mk(2 * tib)
	vhdMax := int64(2040) << 30
	vhdSrc := mk(vhdMax)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			e := e.sub(t)
			s, size := src, 2*tib
			if v.format == "vhd" {
				s, size = vhdSrc, vhdMax
				e.fail([]string{"at most", "vhd"}, append([]string{"convert", src, e.path("toobig." + v.ext)}, v.args()...)...)
			}
			out := e.path("huge-" + v.name + "." + v.ext)
			var res convertOut
			e.okJSON(&res, append([]string{"convert", s, out}, v.args()...)...)
			if res.BytesRead > 1<<20 {
				t.Fatalf("read %d bytes of a disk holding 12 KiB", res.BytesRead)
			}
			if res.Allocated > 16<<20 {
				t.Fatalf("%s takes %d bytes on disk for 12 KiB of data", out, res.Allocated)
			}
			if v.format != "raw" && v.sub != "fixed" && res.FileSize > 300<<20 {
				t.Fatalf("%s is %d bytes long for 12 KiB of data", out, res.FileSize)
			}
			// qemu-img compare reads holes through block status only for
			// some formats; qemu-io checks the data and the zeros around
			// it for all.
			compareSrc := ""
			if v.format == "raw" || v.format == "qcow2" {
				compareSrc = s
			}
			checkImage(t, out, v, size, compareSrc)
			var cmds []string
			for off, c := range islands {
				if off+4096 > size {
					continue
				}
				cmds = append(cmds, "-c", fmt.Sprintf("read -P 0x%x %d 4096", c, off), "-c", fmt.Sprintf("read -P 0 %d 65536", off-65536))
				if after := off + 4096; after+61440 <= size {
					cmds = append(cmds, "-c", fmt.Sprintf("read -P 0 %d 61440", after))
				}
			}
			cmds = append(cmds, "-c", fmt.Sprintf("read -P 0 %d 1048576", size/2-(1<<20)))
			o, err := exec.Command("qemu-io", append([]string{"-r", "-f", v.qemu}, append(cmds, out)...)...).CombinedOutput()
			if err != nil || strings.Contains(string(o), "fail") || strings.Contains(string(o), "error") {
				t.Fatalf("qemu-io on %s: %v\n%s", out, err, o)
			}
		})
	}
}

// TestExportFormats exports a snapshot to every format; --size grows the
// disk.
func TestExportFormats(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	imgs := testImages(t, e.dir)
	src := e.path("mixed.raw")
	b := e.backup(src)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			e := e.sub(t)
			out := e.path("export-" + v.name + "." + v.ext)
			var res convertOut
			e.okJSON(&res, append([]string{"export", b.ShortID, out}, v.args()...)...)
			if res.Snapshot != b.Snapshot || res.VirtualSize != round512(imgs["mixed"]) {
				t.Fatalf("export reported %+v", res)
			}
			checkImage(t, out, v, round512(imgs["mixed"]), src)
			// Grown to 32 MiB: identical where the source has data,
			// zeros beyond.
			grown := e.path("grown-" + v.name + "." + v.ext)
			e.ok(append([]string{"export", "latest", grown, "--size", "32M"}, v.args()...)...)
			checkImage(t, grown, v, 32<<20, src)
		})
	}
	// Guessing from the extension; refusing to overwrite; --force.
	out := e.path("guess.qcow2")
	var res convertOut
	e.okJSON(&res, "export", "latest", out)
	if res.Format != "qcow2" {
		t.Fatalf("format from .qcow2: %s", res.Format)
	}
	before := fileHash(t, out, -1)
	e.fail([]string{"exists", "--force"}, "export", "latest", out)
	if fileHash(t, out, -1) != before {
		t.Fatal("a refused export changed the existing output")
	}
	e.ok("export", "latest", out, "--force", "--format", "qcow2")
	checkImage(t, out, variants[1], round512(imgs["mixed"]), src)
	e.fail([]string{"cannot tell the format", "--format"}, "export", "latest", e.path("disk.xyz"))
	e.fail([]string{"smaller than the disk"}, "export", "latest", e.path("small.qcow2"), "--size", "1M")
	e.fail([]string{"--cpus applies to --format ova only"}, "export", "latest", e.path("x.qcow2"), "--cpus", "2")
	e.fail([]string{"unknown vmdk subformat"}, "export", "latest", e.path("x.vmdk"), "--subformat", "flat")
	// No temporary files are left behind by failures.
	ents, _ := os.ReadDir(e.dir)
	for _, en := range ents {
		if strings.Contains(en.Name(), ".sauve-") {
			t.Fatalf("temporary file left behind: %s", en.Name())
		}
	}
}

type ovfEnvelope struct {
	References struct {
		File []struct {
			Href string `xml:"href,attr"`
			ID   string `xml:"id,attr"`
			Size int64  `xml:"size,attr"`
		} `xml:"File"`
	} `xml:"References"`
	DiskSection struct {
		Disk []struct {
			Capacity int64  `xml:"capacity,attr"`
			DiskID   string `xml:"diskId,attr"`
			FileRef  string `xml:"fileRef,attr"`
			Format   string `xml:"format,attr"`
		} `xml:"Disk"`
	} `xml:"DiskSection"`
	VirtualSystem struct {
		ID       string `xml:"id,attr"`
		Name     string `xml:"Name"`
		Hardware struct {
			Items []struct {
				ResourceType    int    `xml:"ResourceType"`
				ResourceSubType string `xml:"ResourceSubType"`
				VirtualQuantity int64  `xml:"VirtualQuantity"`
				AllocationUnits string `xml:"AllocationUnits"`
				InstanceID      string `xml:"InstanceID"`
				Parent          string `xml:"Parent"`
				HostResource    string `xml:"HostResource"`
			} `xml:"Item"`
		} `xml:"VirtualHardwareSection"`
	} `xml:"VirtualSystem"`
}

// TestExportOVA checks the OVA's layout, manifest, descriptor and disk.
func TestExportOVA(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "tar")
	e := newEnv(t)
	imgs := testImages(t, e.dir)
	src := e.path("sparse.raw")
	e.backup(src)
	for _, c := range []struct{ controller, rtype, sub string }{{"scsi", "6", "lsilogic"}, {"ide", "5", "PIIX4"}, {"sata", "20", "vmware.sata.ahci"}} {
		ovaPath := e.path("web-" + c.controller + ".ova")
		e.ok("export", "latest", ovaPath, "--cpus", "2", "--memory", "2G", "--controller", c.controller, "--name", "web1")
		// GNU tar lists the members, descriptor first.
		list := strings.Fields(sh(t, "tar", "-tf", ovaPath))
		want := []string{"web1.ovf", "web1.mf", "web1-disk1.vmdk"}
		if strings.Join(list, " ") != strings.Join(want, " ") {
			t.Fatalf("%s holds %v, want %v", ovaPath, list, want)
		}
		f, err := os.Open(ovaPath)
		if err != nil {
			t.Fatal(err)
		}
		members := map[string][]byte{}
		sums := map[string]string{}
		tr := tar.NewReader(f)
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if h.Format != tar.FormatUSTAR && h.Format&tar.FormatUSTAR == 0 {
				t.Fatalf("%s: member %s is in tar format %v, not ustar", ovaPath, h.Name, h.Format)
			}
			members[h.Name] = b
			s := sha256.Sum256(b)
			sums[h.Name] = hex.EncodeToString(s[:])
		}
		f.Close()
		// The manifest holds the SHA-256 of the descriptor and disk.
		mf := string(members["web1.mf"])
		for _, n := range []string{"web1.ovf", "web1-disk1.vmdk"} {
			line := fmt.Sprintf("SHA256(%s)= %s\n", n, sums[n])
			if !strings.Contains(mf, line) {
				t.Fatalf("manifest lacks %q:\n%s", line, mf)
			}
		}
		var env ovfEnvelope
		if err := xml.Unmarshal(members["web1.ovf"], &env); err != nil {
			t.Fatalf("descriptor is not XML: %v\n%s", err, members["web1.ovf"])
		}
		if len(env.References.File) != 1 || env.References.File[0].Href != "web1-disk1.vmdk" || env.References.File[0].Size != int64(len(members["web1-disk1.vmdk"])) {
			t.Fatalf("descriptor references %+v", env.References.File)
		}
		d := env.DiskSection.Disk
		if len(d) != 1 || d[0].Capacity != round512(imgs["sparse"]) || d[0].FileRef != env.References.File[0].ID || !strings.HasSuffix(d[0].Format, "#streamOptimized") {
			t.Fatalf("descriptor disk %+v", d)
		}
		got := map[int]string{}
		var parent string
		for _, it := range env.VirtualSystem.Hardware.Items {
			switch it.ResourceType {
			case 3, 4:
				got[it.ResourceType] = fmt.Sprintf("%d %s", it.VirtualQuantity, it.AllocationUnits)
			case 17:
				got[17] = it.HostResource
				parent = it.Parent
			default:
				got[it.ResourceType] = it.ResourceSubType + " " + it.InstanceID
			}
		}
		var ctlID string
		for _, it := range env.VirtualSystem.Hardware.Items {
			if fmt.Sprint(it.ResourceType) == c.rtype {
				ctlID = it.InstanceID
			}
		}
		if got[3] != "2 hertz * 10^6" || got[4] != "2048 byte * 2^20" || got[17] != "ovf:/disk/vmdisk1" ||
			!strings.HasPrefix(got[atoi(c.rtype)], c.sub+" ") || parent != ctlID || env.VirtualSystem.Name != "web1" {
			t.Fatalf("virtual hardware %v (disk parent %s, controller %s)", got, parent, ctlID)
		}
		// The disk taken out of the OVA is the source, for qemu-img.
		vmdkPath := e.path("from-" + c.controller + ".vmdk")
		writeFile(t, vmdkPath, members["web1-disk1.vmdk"])
		checkImage(t, vmdkPath, variant{name: "ova", sub: "streamOptimized", qemu: "vmdk", checks: true}, round512(imgs["sparse"]), src)
	}
	e.fail([]string{"controller"}, "export", "latest", e.path("bad.ova"), "--controller", "floppy")
}

func atoi(s string) int {
	var n int
	fmt.Sscan(s, &n)
	return n
}

// TestImportQemuImages backs up images qemu-img made, in every format
// and with various options, and restores them byte-identical.
func TestImportQemuImages(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	imgs := testImages(t, e.dir)
	src := e.path("mixed.raw")
	cases := []struct {
		name, fmt string
		opts      []string
	}{
		{"qcow2", "qcow2", nil},
		{"qcow2-v2", "qcow2", []string{"-o", "compat=0.10"}},
		{"qcow2-512", "qcow2", []string{"-o", "cluster_size=512"}},
		{"qcow2-2M", "qcow2", []string{"-o", "cluster_size=2M"}},
		{"qcow2-l2ext", "qcow2", []string{"-o", "extended_l2=on"}},
		{"qcow2-refcount1", "qcow2", []string{"-o", "refcount_bits=1,lazy_refcounts=on"}},
		{"qcow2-deflate", "qcow2", []string{"-c"}},
		{"qcow2-zstd", "qcow2", []string{"-c", "-o", "compression_type=zstd"}},
		{"qcow2-prealloc-metadata", "qcow2", []string{"-o", "preallocation=metadata"}},
		{"qcow2-prealloc-full", "qcow2", []string{"-o", "preallocation=full"}},
		{"vmdk-sparse", "vmdk", nil},
		{"vmdk-stream", "vmdk", []string{"-o", "subformat=streamOptimized"}},
		{"vmdk-zeroed-grain", "vmdk", []string{"-o", "zeroed_grain=on"}},
		{"vmdk-split-sparse", "vmdk", []string{"-o", "subformat=twoGbMaxExtentSparse"}},
		{"vmdk-flat", "vmdk", []string{"-o", "subformat=monolithicFlat"}},
		{"vmdk-split-flat", "vmdk", []string{"-o", "subformat=twoGbMaxExtentFlat"}},
		{"vhd-dynamic", "vpc", nil},
		{"vhd-fixed", "vpc", []string{"-o", "subformat=fixed"}},
		{"vhd-force-size", "vpc", []string{"-o", "force_size=on"}},
		{"vhdx", "vhdx", nil},
		{"vhdx-fixed", "vhdx", []string{"-o", "subformat=fixed"}},
		{"vhdx-1M", "vhdx", []string{"-o", "block_size=1M"}},
		{"vdi", "vdi", nil},
		{"vdi-static", "vdi", []string{"-o", "static=on"}},
	}
	// An overlay over a backing chain (libvirt external snapshots): the
	// backup holds the disk the guest sees.
	t.Run("backing-chain", func(t *testing.T) {
		e := e.sub(t)
		base := e.path("chain-base.vmdk")
		sh(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", src, base)
		mid := e.path("chain-mid.qcow2")
		sh(t, "qemu-img", "create", "-f", "qcow2", "-b", "chain-base.vmdk", "-F", "vmdk", mid)
		sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x44 1M 64k", mid)
		top := e.path("chain-top.qcow2")
		sh(t, "qemu-img", "create", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, "16M")
		sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x55 6M 1M", "-c", "write -z 0 4k", "-c", "write -P 0x66 15M 4k", top)
		ref := e.path("chain.ref")
		sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, ref)
		b := e.backup(top)
		if b.Size != 16<<20 {
			t.Fatalf("snapshot of a 16 MiB overlay: %d bytes", b.Size)
		}
		out := e.path("chain.restored")
		e.ok("restore", b.ShortID, out)
		sameFile(t, ref, out)
	})
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := e.sub(t)
			img := e.path("q-" + c.name + "." + c.fmt)
			sh(t, "qemu-img", append(append([]string{"convert", "-f", "raw", "-O", c.fmt}, c.opts...), src, img)...)
			ref := img + ".ref"
			sh(t, "qemu-img", "convert", "-f", c.fmt, "-O", "raw", img, ref)
			st, _ := os.Stat(ref)
			b := e.backup(img, "--tag", c.name)
			if b.Size != st.Size() {
				t.Fatalf("snapshot size %d, virtual size %d", b.Size, st.Size())
			}
			out := e.path("restored-" + c.name)
			e.ok("restore", b.ShortID, out)
			sameFile(t, ref, out)
			// convert reads it too.
			conv := e.path("conv-" + c.name + ".raw")
			e.ok("convert", img, conv)
			sameFile(t, ref, conv)
		})
	}
	// Empty images made by qemu-img create cost nothing to back up.
	t.Run("create", func(t *testing.T) {
		e := e.sub(t)
		for _, c := range []struct{ fmt, opts string }{{"qcow2", ""}, {"vmdk", ""}, {"vmdk", "subformat=streamOptimized"}, {"vpc", ""}, {"vhdx", ""}, {"vdi", ""}} {
			img := e.path("empty-" + strings.ReplaceAll(c.fmt+c.opts, "=", "-"))
			args := []string{"create", "-f", c.fmt}
			if c.opts != "" {
				args = append(args, "-o", c.opts)
			}
			sh(t, "qemu-img", append(args, img, "1G")...)
			var info qemuInfo
			o, _ := qemuImg(t, "info", "--output=json", "-f", c.fmt, img)
			json.Unmarshal([]byte(o), &info)
			b := e.backup(img)
			if b.Size != info.VirtualSize || b.BytesRead != 0 || b.ChunksNew != 0 {
				t.Fatalf("%s: backup of an empty %d-byte image: %+v", img, info.VirtualSize, b)
			}
		}
	})
	// A large sparse image: only allocated data is read.
	t.Run("sparse-read", func(t *testing.T) {
		e := e.sub(t)
		img := e.path("sparse.qcow2")
		sh(t, "qemu-img", "create", "-f", "qcow2", img, "8G")
		sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 4G 1M", img)
		b := e.backup(img)
		if b.Size != 8<<30 || b.BytesRead > 2<<20 {
			t.Fatalf("8 GiB qcow2 holding 1 MiB: %+v", b)
		}
	})
	_ = imgs
}

// TestImportRefusals: what sauve does not read gets a clear error, and
// --source-format raw backs up the file's bytes as they are.
func TestImportRefusals(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	// A chain of backing files that loops.
	a, b := e.path("a.qcow2"), e.path("b.qcow2")
	sh(t, "qemu-img", "create", "-f", "qcow2", a, "16M")
	sh(t, "qemu-img", "create", "-f", "qcow2", "-b", a, "-F", "qcow2", b)
	sh(t, "qemu-img", "rebase", "-u", "-b", b, "-F", "qcow2", a)
	e.fail([]string{"qcow2", "backing file", "loops"}, "backup", b)
	e.fail([]string{"qcow2", "loops"}, "convert", b, e.path("x.raw"))
	// A backing file that is gone.
	c := e.path("c.qcow2")
	sh(t, "qemu-img", "create", "-f", "qcow2", "-b", e.path("gone.qcow2"), "-F", "qcow2", "-u", c, "16M")
	e.fail([]string{"c.qcow2", "qcow2", "gone.qcow2", "no such file"}, "backup", c)
	overlay := c
	vbase := e.path("vbase.vmdk")
	sh(t, "qemu-img", "create", "-f", "vmdk", vbase, "16M")
	delta := e.path("delta.vmdk")
	sh(t, "qemu-img", "create", "-f", "vmdk", "-b", vbase, "-F", "vmdk", delta)
	e.fail([]string{"delta.vmdk", "vmdk", "parent", "qemu-img convert"}, "backup", delta)
	// A descriptor whose extent lies outside its directory.
	evil := e.path("evil.vmdk")
	writeFile(t, evil, []byte("# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 32768 FLAT \"../../etc/passwd\" 0\n"))
	e.fail([]string{"evil.vmdk", "vmdk", "not a plain name beside the descriptor", "offset"}, "backup", evil)
	// A split disk with an extent missing.
	split := e.path("split.vmdk")
	sh(t, "qemu-img", "create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", split, "3G")
	os.Remove(e.path("split-s002.vmdk"))
	e.fail([]string{"split.vmdk", "vmdk", "split-s002.vmdk", "no such file"}, "backup", split)
	v1 := e.path("old.qcow")
	sh(t, "qemu-img", "create", "-f", "qcow", v1, "16M")
	e.fail([]string{"old.qcow", "qcow version 1"}, "backup", v1)
	enc := e.path("enc.qcow2")
	// qemu-img times its key derivation, and fails ("Unable to get
	// accurate CPU usage") when the machine is busy: try a few times.
	for i := 0; ; i++ {
		out, err := exec.Command("qemu-img", "create", "-f", "qcow2", "--object", "secret,id=sec0,data=secret",
			"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", enc, "16M").CombinedOutput()
		if err == nil {
			break
		}
		if i == 4 {
			t.Fatalf("qemu-img create (luks): %v\n%s", err, out)
		}
		time.Sleep(time.Second)
	}
	e.fail([]string{"enc.qcow2", "encrypted"}, "backup", enc)
	// The raw escape hatch: the container's bytes, not the disk.
	st, _ := os.Stat(overlay)
	rb := e.backup(overlay, "--source-format", "raw")
	if rb.Size != st.Size() {
		t.Fatalf("--source-format raw backed up %d bytes of a %d-byte file", rb.Size, st.Size())
	}
	var snaps []json.RawMessage
	e.okJSON(&snaps, "snapshots")
	if len(snaps) != 1 {
		t.Fatalf("%d snapshots after refused backups, want 1", len(snaps))
	}
}

// TestCorruptImages: damaged images fail with one error naming the file,
// the format and an offset; no snapshot is written and nothing panics.
func TestCorruptImages(t *testing.T) {
	requireTool(t, "qemu-img")
	e := newEnv(t)
	testImages(t, e.dir)
	src := e.path("mixed.raw")
	for _, v := range variants {
		if v.format == "raw" || v.sub == "fixed" && v.format == "vhd" {
			continue // no structure to damage: a truncated one is a shorter raw disk
		}
		img := e.path("c-" + v.name + "." + v.ext)
		e.ok(append([]string{"convert", src, img}, v.args()...)...)
		st, _ := os.Stat(img)
		damaged := e.path("d-" + v.name + "." + v.ext)
		data, _ := os.ReadFile(img)
		writeFile(t, damaged, data[:st.Size()/3])
		stderr := e.fail([]string{filepath.Base(damaged), v.format, "offset"}, "backup", damaged)
		if n := strings.Count(stderr, "sauve: error:"); n != 1 || strings.Count(strings.TrimSpace(stderr[strings.Index(stderr, "sauve: error:"):]), "\n") > 0 {
			t.Fatalf("%s: want one error line:\n%s", v.name, stderr)
		}
		e.fail([]string{filepath.Base(damaged), v.format}, "convert", damaged, e.path("x-"+v.name+".raw"))
	}
	var snaps []json.RawMessage
	e.okJSON(&snaps, "snapshots")
	if len(snaps) != 0 {
		t.Fatalf("%d snapshots written from damaged images", len(snaps))
	}
	// Failed conversions leave neither an output nor a temporary file.
	ents, _ := os.ReadDir(e.dir)
	for _, en := range ents {
		if strings.HasPrefix(en.Name(), "x-") || strings.Contains(en.Name(), ".sauve-") {
			t.Fatalf("a failed conversion left %s behind", en.Name())
		}
	}
}

// bootDisk writes a raw disk whose MBR holds a real-mode program: it reads
// a sector far into the disk with the BIOS (int 13h, AH=42h) and writes
// the line found there to COM1, then halts. Booting it proves a converted
// disk's boot sector and its block mapping both reach the guest.
func bootDisk(t *testing.T, path, line string) {
	t.Helper()
	const size = 8<<20 + 1536
	lba := uint64(3<<20)/512 + 7
	code := []byte{
		0xFA,       // cli
		0x31, 0xC0, // xor ax, ax
		0x8E, 0xD8, // mov ds, ax
		0x8E, 0xC0, // mov es, ax
		0x8E, 0xD0, // mov ss, ax
		0xBC, 0x00, 0x7C, // mov sp, 0x7c00
		0xFB,             // sti
		0xBE, 0x2E, 0x7C, // mov si, dap (0x7c2e); dl = boot drive from the BIOS
		0xB4, 0x42, // mov ah, 0x42
		0xCD, 0x13, // int 0x13
		0x72, 0x05, // jc fail
		0xBE, 0x00, 0x80, // mov si, 0x8000 (the sector read)
		0xEB, 0x03, // jmp print
		0xBE, 0x3E, 0x7C, // fail: mov si, errmsg (0x7c3e)
		0xFA,             // print: cli (SeaBIOS's serial console runs from the timer: keep it out of the line)
		0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
		0xAC,       // loop: lodsb
		0x84, 0xC0, // test al, al
		0x74, 0x03, // jz halt
		0xEE,       // out dx, al
		0xEB, 0xF8, // jmp loop
		0xFA,       // halt: cli
		0xF4,       // hlt
		0xEB, 0xFC, // jmp halt
	}
	if len(code) != 46 {
		t.Fatalf("boot code is %d bytes", len(code))
	}
	dap := []byte{0x10, 0, 1, 0, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0} // 1 sector to 0000:8000
	binary.LittleEndian.PutUint64(dap[8:], lba)
	mbr := append(append(code, dap...), "READ-ERROR\r\n\x00"...)
	mbr = append(mbr, make([]byte, 510-len(mbr))...)
	mbr = append(mbr, 0x55, 0xAA)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(size)
	f.WriteAt(mbr, 0)
	f.WriteAt(append([]byte(line+"\r\n"), 0), int64(lba)*512)
	f.WriteAt(randomBytes(200000), 5<<20) // more data for the formats to map
}

// boot runs qemu-system-x86_64 (TCG) on a disk image and waits for line on
// the serial port.
func boot(t *testing.T, img, qemuFormat, line string) {
	t.Helper()
	bootDrive(t, "file="+img+",format="+qemuFormat+",if=ide", true, line)
}

// bootDrive boots QEMU on a -drive spec, under -snapshot or not, and
// waits for line on the serial port.
func bootDrive(t *testing.T, drive string, snapshot bool, line string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	args := []string{"-accel", "tcg", "-nographic", "-monitor", "none",
		"-serial", "stdio", "-m", "32", "-net", "none", "-no-reboot", "-drive", drive}
	if snapshot {
		args = append(args, "-snapshot")
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	// Output is searched as a whole: the line may arrive in pieces.
	var seen bytes.Buffer
	buf := make([]byte, 4096)
	for {
		n, err := stdout.Read(buf)
		seen.Write(buf[:n])
		if bytes.Contains(seen.Bytes(), []byte(line)) {
			return
		}
		if bytes.Contains(seen.Bytes(), []byte("READ-ERROR")) || err != nil {
			break
		}
	}
	t.Fatalf("-drive %s did not print %q on the serial port:\n%s\n%s", drive, line, seen.String(), stderr.String())
}

// TestBootExported exports a bootable disk to every format, and QEMU
// boots each (TCG; KVM hangs on this machine's CI).
func TestBootExported(t *testing.T) {
	requireTool(t, "qemu-system-x86_64")
	e := newEnv(t)
	line := "SAUVE BOOT OK " + hex.EncodeToString(randomBytes(4))
	src := e.path("boot.raw")
	bootDisk(t, src, line)
	e.backup(src)
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			e := e.sub(t)
			out := e.path("boot-" + v.name + "." + v.ext)
			e.ok(append([]string{"export", "latest", out}, v.args()...)...)
			boot(t, out, v.qemu, line)
		})
	}
	t.Run("ova", func(t *testing.T) {
		t.Parallel()
		e := e.sub(t)
		ovaPath := e.path("boot.ova")
		e.ok("export", "latest", ovaPath, "--name", "bootvm")
		dir := e.path("ova")
		os.Mkdir(dir, 0o755)
		sh(t, "tar", "-xf", ovaPath, "-C", dir)
		boot(t, filepath.Join(dir, "bootvm-disk1.vmdk"), "vmdk", line)
	})
	t.Run("convert-back", func(t *testing.T) {
		// V2V: a converted image converts again, and still boots.
		t.Parallel()
		e := e.sub(t)
		a := e.path("v2v.vhdx")
		e.ok("convert", src, a)
		b := e.path("v2v.qcow2")
		e.ok("convert", a, b)
		boot(t, b, "qcow2", line)
	})
}

// TestImportMapsGuestFilesystems: a VM disk image is mapped as the disk it
// holds, so the guest's partition table and filesystems are found inside
// it and free space is neither read nor stored.
func TestImportMapsGuestFilesystems(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "mkfs.ext4")
	requireTool(t, "sfdisk")
	e := newEnv(t)
	files := e.path("files")
	os.Mkdir(files, 0o755)
	writeFile(t, filepath.Join(files, "text"), textBytes(9, 3<<20))
	writeFile(t, filepath.Join(files, "random"), randomBytes(2<<20))
	raw := e.path("guest.raw")
	f, _ := os.Create(raw)
	f.Truncate(96 << 20)
	f.Close()
	c := exec.Command("sfdisk", "-q", raw)
	c.Stdin = strings.NewReader("label: dos\nstart=2048, type=83\n")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", files, raw, "94M")
	for _, fm := range []string{"qcow2", "vmdk", "vhdx"} {
		img := e.path("guest." + fm)
		sh(t, "qemu-img", "convert", "-f", "raw", "-O", fm, raw, img)
		var b struct {
			backupOut
			Partitions []struct {
				Filesystem   string `json:"filesystem"`
				BytesSkipped int64  `json:"bytes_skipped"`
			} `json:"partitions"`
			Table string `json:"partition_table"`
		}
		e.okJSON(&b, "backup", img)
		if b.Size != 96<<20 || b.Table != "mbr" && b.Table != "dos" || len(b.Partitions) != 1 || b.Partitions[0].Filesystem != "ext4" || b.Partitions[0].BytesSkipped < 60<<20 {
			t.Fatalf("%s: backup found %+v", fm, b)
		}
		// qcow2 and vmdk allocate 64 KiB clusters and read about 6 MiB;
		// vhdx allocates 8 MiB blocks, zeros and all, and reads 18 MiB.
		if b.BytesRead > 24<<20 {
			t.Fatalf("%s: read %d bytes of a disk holding about 6 MiB", fm, b.BytesRead)
		}
		out := e.path("restored-" + fm)
		e.ok("restore", b.ShortID, out)
		sameFile(t, raw, out) // free space of a new filesystem is zeros
	}
}

// TestConvertSkipFree: P2V with --skip-free leaves the filesystem's free
// space (here a deleted file's blocks, not zeros) unallocated; the
// filesystem checks clean and its files are intact.
func TestConvertSkipFree(t *testing.T) {
	requireTool(t, "qemu-img")
	requireTool(t, "debugfs")
	requireRoot(t)
	e := newBareEnv(t)
	files := e.path("files")
	os.Mkdir(files, 0o755)
	keep := textBytes(3, 2<<20)
	writeFile(t, filepath.Join(files, "keep"), keep)
	marker := []byte("DELETED-FILE-CONTENT-" + hex.EncodeToString(randomBytes(8)))
	writeFile(t, filepath.Join(files, "gone"), bytes.Repeat(marker, (4<<20)/len(marker)))
	raw := e.path("p2v.raw")
	f, _ := os.Create(raw)
	f.Truncate(64 << 20)
	f.Close()
	c := exec.Command("sfdisk", "-q", raw)
	c.Stdin = strings.NewReader("label: dos\nstart=2048, type=83\n")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", files, raw, "62M")
	dev := losetup(t, raw, "-o", "1048576")
	sh(t, "debugfs", "-w", "-R", "rm gone", dev)
	exec.Command("losetup", "-d", dev).Run()
	if b, _ := os.ReadFile(raw); !bytes.Contains(b, marker) {
		t.Fatal("the deleted file's blocks should still hold its content")
	}
	out := e.path("p2v.vmdk")
	var res convertOut
	e.okJSON(&res, "convert", raw, out, "--skip-free")
	back := e.path("back.raw")
	sh(t, "qemu-img", "convert", "-f", "vmdk", "-O", "raw", out, back)
	b, _ := os.ReadFile(back)
	if bytes.Contains(b, marker) {
		t.Fatal("--skip-free copied the free space")
	}
	dev = losetup(t, back, "-o", "1048576")
	sh(t, "e2fsck", "-fn", dev)
	got := sh(t, "debugfs", "-R", "cat keep", dev)
	if !strings.Contains(got, string(keep[:1000])) || !strings.Contains(got, string(keep[len(keep)-1000:])) {
		t.Fatal("the kept file differs after --skip-free")
	}
	// Without --skip-free the copy is exact.
	exact := e.path("exact.vmdk")
	e.ok("convert", raw, exact)
	if o, code := qemuImg(t, "compare", "-f", "raw", "-F", "vmdk", raw, exact); code != 0 {
		t.Fatalf("exact convert differs: %s", o)
	}
}
