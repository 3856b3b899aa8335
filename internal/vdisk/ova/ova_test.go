package ova

import (
	"archive/tar"
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio/vdiotest"
)

func TestTarHeaderLarge(t *testing.T) {
	// A disk of 8 GiB or more does not fit ustar's size field: GNU
	// base-256, still one block, which archive/tar reads back.
	for _, size := range []int64{1000, 1<<33 - 1, 1 << 33, 3 << 40} {
		h, err := tarHeader("big-disk1.vmdk", size, time.Unix(1700000000, 0))
		if err != nil {
			t.Fatal(err)
		}
		got, err := tar.NewReader(io.MultiReader(bytes.NewReader(h), bytes.NewReader(make([]byte, 1024)))).Next()
		if err != nil || got.Size != size || got.Name != "big-disk1.vmdk" {
			t.Fatalf("size %d read back as %+v, %v", size, got, err)
		}
	}
}

func TestOptions(t *testing.T) {
	var f vdiotest.MemFile
	for _, o := range []Options{
		{Name: "", CPUs: 1, MemoryMiB: 1024, Controller: "ide"},
		{Name: "a/b", CPUs: 1, MemoryMiB: 1024, Controller: "ide"},
		{Name: "vm", CPUs: 0, MemoryMiB: 1024, Controller: "ide"},
		{Name: "vm", CPUs: 1, MemoryMiB: 1, Controller: "ide"},
		{Name: "vm", CPUs: 1, MemoryMiB: 1024, Controller: "floppy"},
		{Name: "vm", CPUs: 1, MemoryMiB: 1024, Controller: "ide", NICs: []NIC{{MAC: "52:54:00:12:34"}}},
		{Name: "vm", CPUs: 1, MemoryMiB: 1024, Controller: "ide", NICs: []NIC{{MAC: "52:54:00:12:34:56</rasd:Address>"}}},
		{Name: "vm", CPUs: 1, MemoryMiB: 1024, Controller: "ide", NICs: make([]NIC, maxNICs+1)},
	} {
		if _, err := NewWriter(&f, 1<<20, o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
	// The descriptor keeps its reserved length whatever the numbers.
	w, err := NewWriter(&f, 1<<20, Options{Name: "vm", CPUs: 2, MemoryMiB: 2048, Controller: "sata"})
	if err != nil {
		t.Fatal(err)
	}
	w.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(bytes.NewReader(f.B))
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	if len(names) != 3 || names[0] != "vm.ovf" || names[1] != "vm.mf" || names[2] != "vm-disk1.vmdk" {
		t.Fatalf("members %v", names)
	}
}
