package restore

import (
	"testing"

	"github.com/sauve-backup/sauve/internal/repo"
)

func TestContentSameDisk(t *testing.T) {
	gpt := func(id string, parts ...ContentPart) *Content {
		return &Content{Table: "gpt", DiskID: id, Parts: parts}
	}
	ext4 := func(n int, uuid string) ContentPart {
		return ContentPart{Number: n, Start: int64(n) << 20, Size: 8 << 20, Filesystem: "ext4", UUID: uuid}
	}
	bare := func(p ContentPart) *Content { p.Number, p.Start = 0, 0; return &Content{Parts: []ContentPart{p}} }
	luks := ContentPart{Number: 0, Size: 16 << 20, Filesystem: "LUKS"}
	cases := []struct {
		name         string
		target, snap *Content
		same         bool
	}{
		{"nothing recognised", &Content{}, gpt("A"), true},
		{"nothing recognised, nothing recorded", &Content{}, &Content{}, true},
		{"same GPT disk, filesystems changed", gpt("A", ext4(1, "u9")), gpt("A", ext4(1, "u1")), true},
		{"same GPT disk, GUID case", gpt("abcd-1"), gpt("ABCD-1"), true},
		{"another GPT disk", gpt("B", ext4(1, "u1")), gpt("A", ext4(1, "u1")), false},
		{"an MBR disk for a GPT snapshot", &Content{Table: "mbr", DiskID: "A"}, gpt("A"), false},
		{"a disk for a snapshot that records nothing", gpt("A"), &Content{}, false},
		{"blank MBR signature, same filesystem", &Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{ext4(1, "u1")}},
			&Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{ext4(1, "u1")}}, true},
		{"blank MBR signature, other filesystem", &Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{ext4(1, "u2")}},
			&Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{ext4(1, "u1")}}, false},
		{"blank MBR signature, no filesystem, same partitions", &Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{{Number: 1, Start: 1 << 20, Size: 4 << 20}}},
			&Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{{Number: 1, Start: 1 << 20, Size: 4 << 20}}}, true},
		{"blank MBR signature, no filesystem, other partitions", &Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{{Number: 1, Start: 2 << 20, Size: 4 << 20}}},
			&Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{{Number: 1, Start: 1 << 20, Size: 4 << 20}}}, false},
		{"same bare filesystem", bare(ext4(0, "u1")), bare(ext4(0, "U1")), true},
		{"other bare filesystem", bare(ext4(0, "u2")), bare(ext4(0, "u1")), false},
		{"one of the snapshot's partitions", bare(ext4(0, "u2")), gpt("A", ext4(1, "u1"), ext4(2, "u2")), true},
		{"bare filesystem for a snapshot that records nothing", bare(ext4(0, "u1")), &Content{}, false},
		{"no identifiers, same kind", &Content{Parts: []ContentPart{luks}}, &Content{Parts: []ContentPart{luks}}, true},
		{"no identifiers, other kind", &Content{Parts: []ContentPart{luks}}, bare(ext4(0, "u1")), false},
	}
	for _, tc := range cases {
		if got := tc.target.SameDisk(tc.snap); got != tc.same {
			t.Errorf("%s: SameDisk = %v, want %v (target %s, snapshot %s)", tc.name, got, tc.same, tc.target, tc.snap)
		}
	}
}

func TestContentString(t *testing.T) {
	part := func(n int, fs, label, uuid string) ContentPart {
		return ContentPart{Number: n, Filesystem: fs, Label: label, UUID: uuid}
	}
	cases := []struct {
		c    *Content
		want string
	}{
		{&Content{}, "nothing sauve recognises"},
		{&Content{Parts: []ContentPart{part(0, "ext4", "data", "u1")}}, "an ext4 filesystem 'data' (uuid u1)"},
		{&Content{Parts: []ContentPart{part(0, "fat32", "", "1A2B-3C4D")}}, "a fat32 filesystem (uuid 1A2B-3C4D)"},
		{&Content{Table: "gpt", DiskID: "G", Parts: []ContentPart{part(1, "ext4", "data", "u1"), part(2, "swap", "", "u2"), part(3, "", "", "")}},
			"a GPT disk G with ext4 'data' (uuid u1), swap (uuid u2)"},
		{&Content{Table: "mbr", DiskID: "00000000", Parts: []ContentPart{part(1, "", "", "")}}, "an MBR disk with 1 partition and no filesystem sauve recognises"},
		{&Content{Table: "mbr", DiskID: "deadbeef"}, "an MBR disk deadbeef with no partitions"},
		{&Content{Table: "gpt", DiskID: "G", Parts: []ContentPart{part(1, "xfs", "", ""), part(2, "xfs", "", ""), part(3, "xfs", "", ""), part(4, "xfs", "", ""), part(5, "xfs", "", ""), part(6, "xfs", "", "")}},
			"a GPT disk G with xfs, xfs, xfs, xfs, 2 more"},
	}
	for _, tc := range cases {
		if got := tc.c.String(); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}

func TestDiskContent(t *testing.T) {
	d := &repo.Disk{PartitionTable: "mbr", DiskID: "5a17e001", Partitions: []repo.Partition{
		{Number: 1, Start: 1 << 20, Size: 16 << 20, Filesystem: "ext2", FSUUID: "u1", Label: "boot"},
		{Number: 2, Start: 17 << 20, Size: 56 << 20, Extended: true},
		{Number: 5, Start: 18 << 20, Size: 16 << 20, Filesystem: "fat16", FSUUID: "1234-ABCD"},
	}}
	c := DiskContent(d)
	if got, want := c.String(), "an MBR disk 5a17e001 with ext2 'boot' (uuid u1), fat16 (uuid 1234-ABCD)"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if len(c.Parts) != 2 {
		t.Fatalf("the extended container is not a partition of its own: %+v", c.Parts)
	}
}
