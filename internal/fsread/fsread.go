// Package fsread holds what the readers of filesystems inside disk images
// share (the ext2/3/4 reader in fsread/ext, and XFS, NTFS and FAT readers
// to come): the metadata of a file as stat(2) would give it, directory
// entries, extended attributes and the data ranges of a file. It lets
// file-level restore (sauve ls, get, find) use any of them through one
// small interface its consumer declares.
package fsread

import (
	"errors"
	"io"
	"time"

	"github.com/sauve-backup/sauve/internal/extent"
)

// File types, as in st_mode.
const (
	TypeMask    = 0o170000
	TypeSocket  = 0o140000
	TypeSymlink = 0o120000
	TypeRegular = 0o100000
	TypeBlock   = 0o060000
	TypeDir     = 0o040000
	TypeChar    = 0o020000
	TypeFIFO    = 0o010000
)

// Stat is a file's metadata as stat(2) gives it.
type Stat struct {
	Ino   uint64
	Mode  uint32 // type bits and permissions, as st_mode
	Nlink uint32
	UID   uint32
	GID   uint32
	Size  int64
	Atime time.Time
	Mtime time.Time
	Ctime time.Time
	// Major and Minor are a device file's numbers.
	Major, Minor uint32
}

// Type is the file type bits of the mode (TypeDir, ...).
func (s *Stat) Type() uint32 { return s.Mode & TypeMask }

// IsDir says whether the file is a directory.
func (s *Stat) IsDir() bool { return s.Type() == TypeDir }

// DirEntry is a name in a directory, with its file's metadata.
type DirEntry struct {
	Name string
	Stat Stat
}

// Xattr is an extended attribute, named with its namespace prefix
// ("user.", "trusted.", "security.", "system.posix_acl_access") and its
// value as getxattr(2) returns it.
type Xattr struct {
	Name  string
	Value []byte
}

// File is a regular file's content.
type File interface {
	io.ReaderAt
	// Size is the file's length in bytes.
	Size() int64
	// Data lists the byte ranges of the file that hold data, in order;
	// the rest are holes (they read as zeros).
	Data() ([]extent.Range, error)
}

// ErrNotExist is wrapped by the errors of paths that name no file.
var ErrNotExist = errors.New("no such file or directory")
