package repo

// Partition is a partition of a disk as its backup found it, or (Number
// 0) a filesystem that fills a disk without a partition table. It records
// what a restore needs to explain the disk; the partition table itself is
// restored byte for byte with the disk.
type Partition struct {
	Number   int    `json:"number"`
	Start    int64  `json:"start"` // bytes
	Size     int64  `json:"size"`  // bytes
	Type     string `json:"type,omitempty"`
	TypeName string `json:"type_name,omitempty"`
	Name     string `json:"name,omitempty"` // GPT partition name
	UUID     string `json:"uuid,omitempty"` // GPT unique partition GUID
	Bootable bool   `json:"bootable,omitempty"`
	// Extended marks an MBR extended partition (a container of logical
	// partitions).
	Extended   bool   `json:"extended,omitempty"`
	Filesystem string `json:"filesystem,omitempty"`
	Label      string `json:"label,omitempty"`
	FSUUID     string `json:"fs_uuid,omitempty"`
	BlockSize  int    `json:"block_size,omitempty"`
	// UsedBytes is how many bytes the filesystem uses; absent when its
	// map could not be read.
	UsedBytes    *int64 `json:"used_bytes,omitempty"`
	BytesRead    int64  `json:"bytes_read"`
	BytesSkipped int64  `json:"bytes_skipped"`
	// ImagedInFull says why free space was not skipped; absent when it
	// was.
	ImagedInFull string `json:"imaged_in_full,omitempty"`
}
