// Package ova writes and reads OVF packages in their single-file form,
// OVA, as DMTF DSP0243 ("Open Virtualization Format Specification", 1.1
// and later) defines it: a tar archive (POSIX ustar; GNU base-256 sizes for a
// disk of 8 GiB or more) holding, in this order, the OVF descriptor, the
// manifest of SHA-256 digests, and the disk as a streamOptimized VMDK.
// The descriptor is an OVF 1.0 envelope with one virtual system: CPU,
// memory, one disk controller (IDE, LSI Logic SCSI or AHCI SATA) and the
// disk, with the CIM RASD elements in schema order and both Caption and
// ElementName, the layout VMware's ovftool and VirtualBox write and read.
//
// The archive is written in one pass: the descriptor's and manifest's
// places are reserved first (their lengths do not depend on the disk's
// contents but for a few digits, which whitespace between elements
// absorbs), the VMDK streams into its place while its digest is computed,
// and the three headers and the two small files are written last.
//
// Read lists an OVA's members (tar headers only; PAX, GNU and ustar
// archives) and the disks its descriptor names, so that a disk is read in
// place at its offset in the archive, never extracted (see reader.go).
package ova

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"regexp"
	"strings"
	"time"

	"github.com/sauve-backup/sauve/internal/vdisk/vdio"
	"github.com/sauve-backup/sauve/internal/vdisk/vmdk"
)

// Options describe the virtual machine.
type Options struct {
	// Name of the virtual machine and the base name of the files inside.
	Name string
	// CPUs and MemoryMiB of the virtual machine.
	CPUs      int
	MemoryMiB int64
	// Controller is ide, scsi or sata.
	Controller string
	// NICs are the machine's network cards, each on the network named
	// "VM Network" (a name the importer maps to one of its own).
	NICs []NIC
	// UEFI asks for UEFI firmware (VMware's firmware=efi setting).
	UEFI bool
}

// NIC is a network card: its MAC address and model, as the backed-up
// machine had it (a Linux driver or QEMU device name), which becomes
// the closest OVF adapter type: E1000, VmxNet3 or PCNet32.
type NIC struct {
	MAC, Model string
}

// maxNICs bounds the cards a descriptor lists.
const maxNICs = 16

// Controllers lists the accepted controller names.
var Controllers = []string{"ide", "scsi", "sata"}

// Writer writes an OVA from a disk that arrives in order.
type Writer struct {
	f       vdio.File
	o       Options
	size    int64
	ovfName string
	mfName  string
	disk    string
	ovfMax  int
	mfOff   int64
	diskHdr int64
	vm      *vmdk.StreamWriter
	h       hash.Hash
	cw      *countWriter
	mtime   time.Time
	done    bool
}

type countWriter struct {
	f   io.WriterAt
	off int64
	n   int64
	h   hash.Hash
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.f.WriteAt(p, c.off+c.n)
	c.h.Write(p[:n])
	c.n += int64(n)
	return n, err
}

// NewWriter starts an OVA holding a disk of size bytes (a multiple of
// 512) in f, a new empty file.
func NewWriter(f vdio.File, size int64, o Options) (*Writer, error) {
	if o.Name == "" || strings.ContainsAny(o.Name, `/\"<>&'`) || len(o.Name) > 80 {
		return nil, fmt.Errorf("ova: virtual machine name %q must be 1 to 80 characters without / \\ \" < > & ' (choose one with --name)", o.Name)
	}
	if o.CPUs < 1 || o.CPUs > 768 {
		return nil, fmt.Errorf("ova: %d CPUs out of range 1..768", o.CPUs)
	}
	if o.MemoryMiB < 4 || o.MemoryMiB > 24<<20 {
		return nil, fmt.Errorf("ova: memory of %d MiB out of range", o.MemoryMiB)
	}
	if _, _, err := controller(o.Controller); err != nil {
		return nil, err
	}
	if len(o.NICs) > maxNICs {
		return nil, fmt.Errorf("ova: %d network cards, at most %d", len(o.NICs), maxNICs)
	}
	for _, n := range o.NICs {
		if !macRE.MatchString(n.MAC) {
			return nil, fmt.Errorf("ova: network card MAC address %q is not six hex pairs", n.MAC)
		}
	}
	w := &Writer{f: f, o: o, size: size, mtime: time.Now()}
	w.ovfName, w.mfName, w.disk = o.Name+".ovf", o.Name+".mf", o.Name+"-disk1.vmdk"
	// Reserve room for the descriptor with the widest numbers.
	w.ovfMax = len(w.descriptor(1<<62, 1<<62))
	w.mfOff = 512 + round512(int64(w.ovfMax))
	w.diskHdr = w.mfOff + 512 + round512(int64(len(w.manifest(make([]byte, 32), make([]byte, 32)))))
	w.h = sha256.New()
	w.cw = &countWriter{f: f, off: w.diskHdr + 512, h: w.h}
	adapter := "ide"
	if o.Controller == "scsi" {
		adapter = "lsilogic"
	}
	var err error
	w.vm, err = vmdk.NewStreamWriter(w.cw, size, vmdk.Options{FileName: w.disk, Adapter: adapter})
	if err != nil {
		return nil, err
	}
	return w, nil
}

func round512(n int64) int64 { return (n + 511) / 512 * 512 }

// WriteAt writes p at virtual offset off; offsets increase from call to
// call.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) { return w.vm.WriteAt(p, off) }

// DataBytes returns how many bytes of non-zero data were written.
func (w *Writer) DataBytes() int64 { return w.vm.DataBytes() }

// Close finishes the disk and writes the descriptor, manifest and tar
// headers.
func (w *Writer) Close() error {
	if w.done {
		return nil
	}
	w.done = true
	if err := w.vm.Close(); err != nil {
		return err
	}
	diskLen := w.cw.n
	diskSum := w.h.Sum(nil)
	end := w.diskHdr + 512 + round512(diskLen)
	// Padding of the last member and the end-of-archive blocks: the
	// file is new, so they are zeros once the size is set.
	if err := w.f.Truncate(end + 1024); err != nil {
		return err
	}
	d := w.descriptor(diskLen, w.vm.DataBytes())
	if len(d) > w.ovfMax {
		return fmt.Errorf("ova: internal error: descriptor grew to %d bytes, %d reserved", len(d), w.ovfMax)
	}
	// Whitespace before the closing tag keeps the reserved length.
	pad := bytes.Repeat([]byte{' '}, w.ovfMax-len(d))
	d = bytes.Replace(d, []byte("</Envelope>"), append(pad, "</Envelope>"...), 1)
	ovfSum := sha256.Sum256(d)
	mf := w.manifest(ovfSum[:], diskSum)
	var hdrs [3][]byte
	for i, m := range []struct {
		name string
		n    int64
	}{{w.ovfName, int64(len(d))}, {w.mfName, int64(len(mf))}, {w.disk, diskLen}} {
		var err error
		if hdrs[i], err = tarHeader(m.name, m.n, w.mtime); err != nil {
			return err
		}
	}
	parts := []struct {
		off  int64
		data []byte
	}{
		{0, hdrs[0]},
		{512, d},
		{w.mfOff, hdrs[1]},
		{w.mfOff + 512, mf},
		{w.diskHdr, hdrs[2]},
	}
	for _, p := range parts {
		if _, err := w.f.WriteAt(p.data, p.off); err != nil {
			return err
		}
	}
	return nil
}

// Abort stops the disk writer after a failure.
func (w *Writer) Abort() { w.vm.Abort() }

// tarHeader returns the one 512-byte header block of a member.
func tarHeader(name string, size int64, mtime time.Time) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	h := &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: size, Mode: 0o644, ModTime: mtime.Truncate(time.Second), Format: tar.FormatUSTAR}
	if size >= 1<<33 {
		h.Format = tar.FormatGNU
	}
	if err := tw.WriteHeader(h); err != nil {
		return nil, fmt.Errorf("ova: tar header for %s: %w", name, err)
	}
	if buf.Len() != 512 {
		return nil, fmt.Errorf("ova: tar header for %s takes %d bytes, not one block", name, buf.Len())
	}
	return buf.Bytes(), nil
}

func (w *Writer) manifest(ovfSum, diskSum []byte) []byte {
	return fmt.Appendf(nil, "SHA256(%s)= %s\nSHA256(%s)= %s\n", w.ovfName, hex.EncodeToString(ovfSum), w.disk, hex.EncodeToString(diskSum))
}

// controller returns the RASD resource type and subtype of a controller.
func controller(name string) (int, string, error) {
	switch name {
	case "ide":
		return 5, "PIIX4", nil
	case "scsi":
		return 6, "lsilogic", nil
	case "sata":
		return 20, "vmware.sata.ahci", nil
	}
	return 0, "", fmt.Errorf("ova: unknown controller %q (choose ide, scsi or sata)", name)
}

func (w *Writer) descriptor(diskLen, populated int64) []byte {
	ctype, csub, _ := controller(w.o.Controller)
	cname := map[string]string{"ide": "IDE Controller", "scsi": "SCSI Controller", "sata": "SATA Controller"}[w.o.Controller]
	var b bytes.Buffer
	fmt.Fprintf(&b, `<?xml version="1.0" encoding="UTF-8"?>
<!--Generated by sauve-->
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="%[1]s" ovf:id="file1" ovf:size="%[2]d"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks</Info>
    <Disk ovf:capacity="%[3]d" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="%[4]d"/>
  </DiskSection>
  <VirtualSystem ovf:id="%[5]s">
    <Info>A virtual machine</Info>
    <Name>%[5]s</Name>
    <OperatingSystemSection ovf:id="1">
      <Info>The kind of installed guest operating system</Info>
      <Description>Other</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>%[5]s</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-07</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Caption>%[6]d virtual CPU(s)</rasd:Caption>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>%[6]d virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>%[6]d</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Caption>%[7]dMB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>%[7]dMB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>%[7]d</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>%[8]s 0</rasd:Caption>
        <rasd:Description>%[8]s</rasd:Description>
        <rasd:ElementName>%[8]s 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>%[9]s</rasd:ResourceSubType>
        <rasd:ResourceType>%[10]d</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
%[11]s    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`, w.disk, diskLen, w.size, populated, w.o.Name, w.o.CPUs, w.o.MemoryMiB, cname, csub, ctype, w.extraHardware())
	d := b.Bytes()
	if len(w.o.NICs) > 0 {
		d = bytes.Replace(d, []byte("  <VirtualSystem "), []byte(networkSection+"  <VirtualSystem "), 1)
	}
	return d
}

// networkSection declares the network the cards are on.
const networkSection = `  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
`

var macRE = regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`)

// extraHardware is the network cards' items and the firmware setting.
func (w *Writer) extraHardware() string {
	var b strings.Builder
	for i, n := range w.o.NICs {
		fmt.Fprintf(&b, `      <Item>
        <rasd:Address>%s</rasd:Address>
        <rasd:AddressOnParent>%d</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on "VM Network"</rasd:Caption>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter %d</rasd:ElementName>
        <rasd:InstanceID>%d</rasd:InstanceID>
        <rasd:ResourceSubType>%s</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
`, strings.ToLower(n.MAC), 7+i, i+1, 5+i, adapterType(n.Model))
	}
	if w.o.UEFI {
		b.WriteString(`      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
`)
	}
	return b.String()
}

// adapterType is the OVF adapter closest to a card's model.
func adapterType(model string) string {
	m := strings.ToLower(model)
	switch {
	case strings.Contains(m, "vmxnet"):
		return "VmxNet3"
	case strings.Contains(m, "pcnet"):
		return "PCNet32"
	}
	return "E1000" // what every importer and guest knows
}
