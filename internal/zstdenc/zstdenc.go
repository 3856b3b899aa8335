// Package zstdenc compresses blobs into single zstd frames, one call per
// blob, at a level from 1 (fastest) to 19.
//
// Built with cgo (the default where a C compiler is present), it calls
// libzstd through github.com/DataDog/zstd, which carries the library's
// source. On the reference disk's 256 KiB chunks libzstd at level 1 is
// 1.5 times as fast as klauspost/compress at SpeedFastest and writes
// 1.7% less, and level 3 writes 5% less in the same time
// (docs/BENCHMARKS.md, issue 16): compression is three quarters of a
// backup's CPU. Built without cgo (CGO_ENABLED=0, for the static binaries
// that go into guests), it uses klauspost/compress, whose levels are
// coarser. Both write standard frames, with the content size and without
// a checksum, that every zstd decoder reads: the choice is the binary's,
// never the repository's, and decoding always uses klauspost/compress,
// whose limits on memory the repository relies on.
package zstdenc

import "fmt"

// Level bounds.
const (
	MinLevel = 1
	MaxLevel = 19
	// DefaultLevel is what backups use unless told otherwise.
	DefaultLevel = 1
)

// ParseLevel reads a level as the --compression flag gives it: a number
// from MinLevel to MaxLevel, or fast (1), better (3) or max (9, the
// level beyond which libzstd's gains on 256 KiB chunks are under 0.5%
// for each doubling of the time).
func ParseLevel(s string) (int, error) {
	switch s {
	case "fast", "":
		return DefaultLevel, nil
	case "better":
		return 3, nil
	case "max":
		return 9, nil
	}
	var n int
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || fmt.Sprint(n) != s || n < MinLevel || n > MaxLevel {
		return 0, fmt.Errorf("compression %q: want fast, better, max or a level from %d to %d", s, MinLevel, MaxLevel)
	}
	return n, nil
}

// CheckLevel reports whether level is one an Encoder takes.
func CheckLevel(level int) error {
	if level < MinLevel || level > MaxLevel {
		return fmt.Errorf("compression level %d: must be between %d and %d", level, MinLevel, MaxLevel)
	}
	return nil
}
