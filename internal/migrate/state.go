package migrate

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/zeebo/blake3"
)

// HashSize is the size of a chunk's hash (BLAKE3-256).
const HashSize = 32

// Hash is a chunk's BLAKE3-256 hash; the zero Hash means "unknown": the
// target's chunk may hold anything and is written at the next pass.
type Hash [HashSize]byte

// Identity says which source or target a state file is of. Path is
// informative; the rest must match for the state to be used.
type Identity struct {
	Path string `json:"path"`
	Size int64  `json:"size"`
	// Device is a block device's major:minor; empty for a file.
	Device string `json:"device,omitempty"`
	// FileDev and Inode identify a regular file (st_dev, st_ino).
	FileDev uint64 `json:"file_dev,omitempty"`
	Inode   uint64 `json:"inode,omitempty"`
	// DiskID is the partition table's disk ID (GPT GUID, MBR signature),
	// FSUUIDs the UUIDs of the filesystems found on it, in order.
	DiskID  string   `json:"disk_id,omitempty"`
	FSUUIDs []string `json:"fs_uuids,omitempty"`
	// VM and Drive identify a drive of a running VM (a qemu: source):
	// the VM's UUID ("name=" and its name without one) and the drive's
	// id. Empty for a device or file.
	VM    string `json:"vm,omitempty"`
	Drive string `json:"drive,omitempty"`
	// Snapshot says the source is a disk of a repository snapshot: it
	// has no device or inode, and Path names the host and the source
	// as backed up.
	Snapshot bool `json:"snapshot,omitempty"`
}

// Mismatch says how other differs from id ("" when they match). A
// repository snapshot and a device or file (one has Snapshot set, the
// other not) are one disk when their size, disk ID and filesystem UUIDs
// match: a snapshot has no device or inode to compare.
func (id Identity) Mismatch(other Identity) string {
	if id.Snapshot != other.Snapshot {
		return id.layoutMismatch(other)
	}
	switch {
	case id.VM != other.VM:
		return fmt.Sprintf("VM %q, not %q", other.VM, id.VM)
	case id.Drive != other.Drive:
		return fmt.Sprintf("drive %q, not %q", other.Drive, id.Drive)
	case id.Size != other.Size:
		return fmt.Sprintf("size %d, not %d", other.Size, id.Size)
	case id.Device != other.Device:
		return fmt.Sprintf("device %q, not %q", other.Device, id.Device)
	case id.FileDev != other.FileDev || id.Inode != other.Inode:
		return fmt.Sprintf("file %d:%d, not %d:%d (device:inode)", other.FileDev, other.Inode, id.FileDev, id.Inode)
	case id.DiskID != other.DiskID:
		return fmt.Sprintf("disk ID %q, not %q", other.DiskID, id.DiskID)
	case !equalStrings(id.FSUUIDs, other.FSUUIDs):
		return fmt.Sprintf("filesystem UUIDs %q, not %q", other.FSUUIDs, id.FSUUIDs)
	case id.Snapshot && id.DiskID == "" && len(id.FSUUIDs) == 0 && id.Path != other.Path:
		// Two snapshots with no layout to compare: of the same host and
		// source as backed up, or refused.
		return fmt.Sprintf("no disk ID or filesystem UUID to compare, and it is of %s, not %s", other.Path, id.Path)
	}
	return ""
}

// layoutMismatch compares a snapshot's identity with a device's or a
// file's: by what the disk holds, never by where it is.
func (id Identity) layoutMismatch(other Identity) string {
	if id.VM != "" || other.VM != "" {
		return "a repository snapshot and a running VM's drive (qemu:): a VM drive's passes do not continue a snapshot's, nor the other way round"
	}
	noIDs := func(i Identity) bool { return i.DiskID == "" && len(i.FSUUIDs) == 0 }
	switch {
	case id.Size != other.Size:
		return fmt.Sprintf("size %d, not %d", other.Size, id.Size)
	case noIDs(id) && noIDs(other):
		return "no disk ID and no filesystem UUID, nor has the state's source: nothing tells a snapshot and a device or file to be one disk"
	case id.DiskID != other.DiskID:
		return fmt.Sprintf("disk ID %q, not %q", other.DiskID, id.DiskID)
	case !equalStrings(id.FSUUIDs, other.FSUUIDs):
		return fmt.Sprintf("filesystem UUIDs %q, not %q", other.FSUUIDs, id.FSUUIDs)
	}
	return ""
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Header is what a state file says it is of.
type Header struct {
	ChunkSize int      `json:"-"`
	Source    Identity `json:"source"`
	Target    Identity `json:"target"`
	// Passes counts the passes completed, LastStart is when the last
	// one started: the next pass's rate of change is measured from it.
	Passes    int       `json:"passes,omitempty"`
	LastStart time.Time `json:"last_start,omitzero"`
	// Tracker names what records the source's writes since the instant
	// of a completed pass (a QEMU dirty bitmap generation, as
	// source.View.Tracker): every chunk the state knows holds what the
	// source held at that instant or later, so the next pass reads only
	// what it records as written (and the chunks the state does not
	// know). Empty: every pass reads every chunk.
	Tracker string `json:"tracker,omitempty"`
	// Snapshot is the repository snapshot's disk that the last completed
	// pass read: every chunk the state knows holds that disk's chunk
	// (nil: the last pass read a device or file, or none yet). Begun
	// are the snapshots' disks of the passes begun since, which may have
	// written some of their chunks before they failed. The next pass
	// from a snapshot reads only the chunks whose IDs differ between its
	// disk and any of these.
	Snapshot *SnapshotRef  `json:"snapshot,omitempty"`
	Begun    []SnapshotRef `json:"snapshots_begun,omitempty"`
}

// SnapshotRef names a disk of a repository snapshot.
type SnapshotRef struct {
	Repository string    `json:"repository"` // the repository's ID
	Snapshot   string    `json:"snapshot"`   // the snapshot's ID, hex
	Disk       string    `json:"disk"`
	Time       time.Time `json:"time,omitzero"` // informative
}

// Same says whether r and o name the same disk of the same snapshot.
func (r SnapshotRef) Same(o SnapshotRef) bool {
	return r.Repository == o.Repository && r.Snapshot == o.Snapshot && r.Disk == o.Disk
}

// Chunks is the number of chunks of the source.
func (h *Header) Chunks() int64 {
	return (h.Source.Size + int64(h.ChunkSize) - 1) / int64(h.ChunkSize)
}

// The state file (docs/FORMAT.md, "Migration state").
const (
	stateMagic     = "SAUVEMIG"
	journalMagic   = "SAUVEMJ1"
	stateVersion   = 1
	maxIdentity    = 64 << 10
	minChunkSize   = 4 << 10
	maxChunkSize   = 64 << 20
	journalRecord  = 8 + HashSize + 8
	journalHeader  = 8 + HashSize
	stateFixedSize = 8 + 2 + 4 + 8 + 4 // magic, version, chunk size, chunks, identity length
)

// maxStateFile bounds what is read of a state file: 32 M chunks (32 TiB
// at 1 MiB chunks).
const maxStateFile = stateFixedSize + maxIdentity + 32<<20*HashSize + HashSize

// ErrNoState is returned by Load when there is no state file.
var ErrNoState = errors.New("no migration state")

// State is the hash of every chunk as the target holds it (the zero Hash
// where that is not known), kept in a file: a base written whole by
// atomic rename, and a journal of the changes since, appended and synced
// as the pass goes. A chunk's hash is set in the journal only after the
// target's write of it is durable, and cleared (unknown) before the
// target is written, so that a crash at any point leaves no chunk
// claimed that the target may not hold.
type State struct {
	Header Header
	path   string
	hashes []Hash
	base   Hash // checksum of the base file, binding the journal to it
	jf     *os.File
}

// Hashes returns the chunks' hashes (not a copy: read only).
func (s *State) Hashes() []Hash { return s.hashes }

// Path returns the state file's path.
func (s *State) Path() string { return s.path }

// Create writes a new state file at path of h, with every chunk's hash
// set to initial(i) (the zero Hash: unknown), replacing any.
func Create(path string, h Header, initial func(i int64) Hash) (*State, error) {
	if h.ChunkSize < minChunkSize || h.ChunkSize > maxChunkSize || h.ChunkSize&(h.ChunkSize-1) != 0 {
		return nil, fmt.Errorf("chunk size %d: want a power of two from %d to %d", h.ChunkSize, minChunkSize, maxChunkSize)
	}
	if h.Source.Size <= 0 || h.Chunks() > (maxStateFile-stateFixedSize-maxIdentity-HashSize)/HashSize {
		return nil, fmt.Errorf("source size %d: out of what a state file holds", h.Source.Size)
	}
	s := &State{Header: h, path: path, hashes: make([]Hash, h.Chunks())}
	if initial != nil {
		for i := range s.hashes {
			s.hashes[i] = initial(int64(i))
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create state folder: %w", err)
	}
	if err := s.writeBase(); err != nil {
		return nil, err
	}
	return s, nil
}

// Load reads the state file at path and the journal beside it.
// ErrNoState says there is none.
func Load(path string) (*State, error) {
	b, err := readMax(path, maxStateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoState
	}
	if err != nil {
		return nil, fmt.Errorf("read migration state: %w", err)
	}
	s, err := decodeState(b)
	if err != nil {
		return nil, fmt.Errorf("migration state %s: %w", path, err)
	}
	s.path = path
	replayed, err := s.replay()
	if err != nil {
		return nil, fmt.Errorf("migration state %s: %w", path, err)
	}
	if replayed {
		// Fold the journal into the base: the next records go to a new
		// journal, which must not follow a torn record.
		if err := s.writeBase(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

func readMax(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, max)
	}
	return b, nil
}

// encode returns the base file's bytes.
func (s *State) encode() ([]byte, error) {
	id, err := json.Marshal(s.Header)
	if err != nil {
		return nil, err
	}
	if len(id) > maxIdentity {
		return nil, fmt.Errorf("identity of %d bytes: at most %d", len(id), maxIdentity)
	}
	var buf bytes.Buffer
	buf.Grow(stateFixedSize + len(id) + len(s.hashes)*HashSize + HashSize)
	buf.WriteString(stateMagic)
	buf.Write(binary.LittleEndian.AppendUint16(nil, stateVersion))
	buf.Write(binary.LittleEndian.AppendUint32(nil, uint32(s.Header.ChunkSize)))
	buf.Write(binary.LittleEndian.AppendUint64(nil, uint64(len(s.hashes))))
	buf.Write(binary.LittleEndian.AppendUint32(nil, uint32(len(id))))
	buf.Write(id)
	for i := range s.hashes {
		buf.Write(s.hashes[i][:])
	}
	sum := blake3.Sum256(buf.Bytes())
	buf.Write(sum[:])
	return buf.Bytes(), nil
}

// decodeState parses a base file. Every length is checked against what
// b holds before anything is allocated.
func decodeState(b []byte) (*State, error) {
	if len(b) < stateFixedSize+HashSize || string(b[:8]) != stateMagic {
		return nil, errors.New("not a sauve migration state file")
	}
	body, sum := b[:len(b)-HashSize], b[len(b)-HashSize:]
	if got := blake3.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, errors.New("checksum mismatch: the file is damaged")
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != stateVersion {
		return nil, fmt.Errorf("version %d: this sauve reads version %d", v, stateVersion)
	}
	cs := binary.LittleEndian.Uint32(b[10:])
	n := binary.LittleEndian.Uint64(b[14:])
	idLen := binary.LittleEndian.Uint32(b[22:])
	if idLen > maxIdentity || uint64(idLen) > uint64(len(body)-stateFixedSize) {
		return nil, fmt.Errorf("identity of %d bytes does not fit", idLen)
	}
	rest := body[stateFixedSize+int(idLen):]
	if n != uint64(len(rest))/HashSize || uint64(len(rest))%HashSize != 0 {
		return nil, fmt.Errorf("%d chunks do not match the %d bytes of hashes", n, len(rest))
	}
	var h Header
	if err := json.Unmarshal(body[stateFixedSize:stateFixedSize+int(idLen)], &h); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	h.ChunkSize = int(cs)
	if cs < minChunkSize || cs > maxChunkSize || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("chunk size %d", cs)
	}
	if h.Source.Size <= 0 || uint64(h.Chunks()) != n {
		return nil, fmt.Errorf("source of %d bytes does not have %d chunks of %d", h.Source.Size, n, cs)
	}
	s := &State{Header: h, hashes: make([]Hash, n)}
	for i := range s.hashes {
		copy(s.hashes[i][:], rest[i*HashSize:])
	}
	copy(s.base[:], sum)
	return s, nil
}

// writeBase writes the base file whole under a temporary name, syncs it
// and renames it into place, then drops the journal it supersedes.
func (s *State) writeBase() error {
	b, err := s.encode()
	if err != nil {
		return err
	}
	dir := filepath.Dir(s.path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(s.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write migration state: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write migration state %s: %w", s.path, err)
	}
	copy(s.base[:], b[len(b)-HashSize:])
	if err := syncDir(dir); err != nil {
		return err
	}
	// The journal's records are in the new base; its header names the
	// old base, so that a journal left behind by a crash here is ignored.
	if s.jf != nil {
		s.jf.Close()
		s.jf = nil
	}
	if err := os.Remove(s.journalPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove migration journal: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

func (s *State) journalPath() string { return s.path + ".journal" }

// recordCheck binds a journal record to its base and catches torn
// records.
func (s *State) recordCheck(rec []byte) [8]byte {
	h := blake3.New()
	h.Write(s.base[:])
	h.Write(rec[:8+HashSize])
	var out [8]byte
	copy(out[:], h.Sum(nil))
	return out
}

// replay applies the journal of the base, if any. A torn last record
// (a crash while it was appended) is ignored; a damaged record before
// the last one is an error. It says whether there was a journal.
func (s *State) replay() (bool, error) {
	b, err := readMax(s.journalPath(), journalHeader+(int64(len(s.hashes))*4+1<<20)*journalRecord)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read journal: %w", err)
	}
	return true, s.applyJournal(b)
}

// applyJournal applies the journal b to the hashes (see replay).
func (s *State) applyJournal(b []byte) error {
	if len(b) < journalHeader || string(b[:8]) != journalMagic || !bytes.Equal(b[8:journalHeader], s.base[:]) {
		// Torn at creation, or of an earlier base whose records the
		// base holds already.
		return nil
	}
	recs := b[journalHeader:]
	for len(recs) >= journalRecord {
		rec := recs[:journalRecord]
		recs = recs[journalRecord:]
		if c := s.recordCheck(rec); !bytes.Equal(c[:], rec[8+HashSize:]) {
			if len(recs) < journalRecord {
				return nil // the last record, torn
			}
			return errors.New("journal damaged before its end: start over with --reset")
		}
		i := binary.LittleEndian.Uint64(rec)
		if i >= uint64(len(s.hashes)) {
			return fmt.Errorf("journal names chunk %d of %d", i, len(s.hashes))
		}
		copy(s.hashes[i][:], rec[8:])
	}
	return nil
}

// Compact writes the state whole and starts an empty journal: at the
// start and at the end of a pass.
func (s *State) Compact() error { return s.writeBase() }

// openJournal creates the journal of the current base.
func (s *State) openJournal() error {
	if s.jf != nil {
		return nil
	}
	f, err := os.OpenFile(s.journalPath(), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create migration journal: %w", err)
	}
	hdr := append([]byte(journalMagic), s.base[:]...)
	if _, err := f.Write(hdr); err != nil {
		f.Close()
		return fmt.Errorf("write migration journal: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync migration journal: %w", err)
	}
	if err := syncDir(filepath.Dir(s.path)); err != nil {
		f.Close()
		return err
	}
	s.jf = f
	return nil
}

// Set records hashes[k] as chunk idx[k]'s, durably (the journal is
// synced before it returns). A zero Hash marks a chunk unknown.
func (s *State) Set(idx []int64, hashes []Hash) error {
	if len(idx) == 0 {
		return nil
	}
	if err := s.openJournal(); err != nil {
		return err
	}
	buf := make([]byte, 0, len(idx)*journalRecord)
	for k, i := range idx {
		rec := binary.LittleEndian.AppendUint64(nil, uint64(i))
		rec = append(rec, hashes[k][:]...)
		c := s.recordCheck(rec)
		buf = append(append(buf, rec...), c[:]...)
	}
	if _, err := s.jf.Write(buf); err != nil {
		return fmt.Errorf("write migration journal: %w", err)
	}
	if err := s.jf.Sync(); err != nil {
		return fmt.Errorf("sync migration journal: %w", err)
	}
	for k, i := range idx {
		s.hashes[i] = hashes[k]
	}
	return nil
}

// Close closes the journal (the state stays as the journal left it).
func (s *State) Close() error {
	if s.jf == nil {
		return nil
	}
	err := s.jf.Close()
	s.jf = nil
	return err
}
