// Package blockmap tells which byte ranges of a disk hold data, so that a
// backup reads only those: holes of sparse image files (Sparse), and a
// whole disk's layout (Layout): its partition table (package ptable), and
// in each partition the used blocks of ext2/3/4, XFS, NTFS, FAT12/16/32
// and swap. What it cannot trust (unknown, damaged, unclean or mounted
// filesystems, bad partition entries) it maps as data, so it is imaged in
// full; nothing it reads is believed without a bounds check.
//
// The filesystem readers are written by hand: a backup needs only the
// allocation maps, read lazily and in order with bounded memory, and must
// treat every on-disk value as hostile; the Go filesystem libraries read
// files (more code, more attack surface), mostly for one filesystem each,
// and do not report the damage and unclean states a backup must act on.
package blockmap
