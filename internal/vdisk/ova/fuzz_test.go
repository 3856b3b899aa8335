package ova

import (
	"archive/tar"
	"bytes"
	"testing"

	"github.com/sauve-backup/sauve/internal/fuzzimg"
)

// TestMain bounds the fuzzer's minimizing (see package fuzzimg): tar
// inputs are kilobytes long, and minimizing one for a minute stalls the
// run.
func TestMain(m *testing.M) { fuzzimg.Main(m) }

// FuzzRead: any bytes give an error or a package whose members lie in
// the file, without a panic, a hang or a large allocation.
func FuzzRead(f *testing.F) {
	vmdk := "KDMV" + string(make([]byte, 508))
	d1 := ovf(ref("f1", "disk1.vmdk"), disk("vmdisk1", "f1"))
	f.Add(archive(f, tar.FormatUSTAR, file{"vm.ovf", d1, 0}, file{"vm.mf", "x", 0}, file{"disk1.vmdk", vmdk, 0}))
	f.Add(archive(f, tar.FormatPAX, file{"./vm.ovf", d1, 0}, file{"./disk1.vmdk", vmdk, 0}))
	f.Add(archive(f, tar.FormatGNU, file{"vm.ovf", ovf(ref("f1", "a.vmdk")+ref("f2", "b.vmdk"), disk("d1", "f1")+disk("d2", "f2")+`<Disk ovf:diskId="d3"/>`), 0},
		file{"a.vmdk", vmdk, 0}, file{"b.vmdk", vmdk, 0}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 1<<16 {
			return
		}
		r := bytes.NewReader(b)
		IsTar(b)
		Sniff(r, int64(len(b)))
		p, err := Read(r, int64(len(b)), "fuzz.ova")
		if err != nil {
			return
		}
		for _, d := range p.Disks {
			if m := d.File; m != nil && (m.Offset < 0 || m.Size < 0 || m.Offset+m.Size > int64(len(b))) {
				t.Fatalf("disk %s: member %+v outside a file of %d bytes", d.ID, m, len(b))
			}
		}
	})
}
