// Command seqblk writes sequence-numbered 4 KiB blocks to a disk (or a
// file) while a backup reads it, and checks that an image of that disk
// holds one point in time of the writes: the test guest of
// test/guest/run.sh uses it to show that sauve's LVM snapshots are not
// torn.
//
// The writer numbers its writes 1, 2, 3, ... and writes block number s
// at position pos(s) = ((s-1)·stride) mod n of a region of n blocks,
// one O_DIRECT write at a time, each finished before the next starts:
// so the device sees the writes in order, and any instant of it holds
// exactly writes 1..c for some cut c. The stride scatters consecutive
// writes over the region, so that a read racing the writer in either
// direction sees some write without an earlier one, which check finds.
//
//	seqblk write [-blocks N] [-stride K] [-bs BYTES] [-max WRITES] [-ready FILE] PATH
//	seqblk check [-blocks N] [-stride K] PATH
//	seqblk tear  [-blocks N] [-stride K] PATH
//
// write zeroes the region first, then writes until SIGTERM (or -max
// writes) and prints "last=S" (the last write finished). check prints
// "cut=C" and exits 0 when the image holds writes 1..C and nothing else,
// 1 when it does not. tear rewrites one block of a consistent image as
// it was one write of its position earlier: a read that raced the
// writer; check must then fail.
package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const (
	blockSize = 4096
	magic     = "SAUVESEQ"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: seqblk write|check|tear [flags] PATH")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "write":
		err = cmdWrite(os.Args[2:])
	case "check":
		err = cmdCheck(os.Args[2:])
	case "tear":
		err = cmdTear(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (write, check, tear)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "seqblk:", err)
		os.Exit(1)
	}
}

// layout is where the writes go: n blocks, write s at pos(s).
type layout struct {
	n, stride uint64
}

func (l layout) pos(s uint64) uint64 { return ((s - 1) * l.stride) % l.n }

// latest is the last write at position p among writes 1..cut, or 0 when
// none of them was at p.
func (l layout) latest(p, cut uint64) uint64 {
	// pos is a bijection on one round of n writes: the first write at p
	// is the one whose (s-1)·stride ≡ p, found by walking the round.
	first := l.first(p)
	if first > cut {
		return 0
	}
	return first + (cut-first)/l.n*l.n
}

func (l layout) first(p uint64) uint64 {
	inv := modInverse(l.stride%l.n, l.n)
	return (p*inv)%l.n + 1
}

// modInverse returns x with a·x ≡ 1 (mod m); a and m are coprime
// (validate checks).
func modInverse(a, m uint64) uint64 {
	if m == 1 {
		return 0
	}
	var t, newT int64 = 0, 1
	r, newR := int64(m), int64(a)
	for newR != 0 {
		q := r / newR
		t, newT = newT, t-q*newT
		r, newR = newR, r-q*newR
	}
	if t < 0 {
		t += int64(m)
	}
	return uint64(t)
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

func (l layout) validate() error {
	if l.n == 0 || l.n > 1<<30 {
		return fmt.Errorf("-blocks %d: want 1 to 2^30", l.n)
	}
	if l.stride == 0 || gcd(l.stride, l.n) != 1 {
		return fmt.Errorf("-stride %d shares a factor with -blocks %d: every position must be written", l.stride, l.n)
	}
	return nil
}

// block fills b (blockSize bytes) with write s at position p: a header
// and bytes that only write s has, so that a block half old and half
// new, or of another write, never passes for write s.
func block(b []byte, s, p uint64) {
	copy(b, magic)
	binary.LittleEndian.PutUint64(b[8:], s)
	binary.LittleEndian.PutUint64(b[16:], p)
	x := s*0x9E3779B97F4A7C15 + p
	for i := 24; i < blockSize; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

func layoutFlags(fs *flag.FlagSet) *layout {
	l := &layout{}
	fs.Uint64Var(&l.n, "blocks", 1024, "blocks in the region (4 KiB each, from offset 0)")
	fs.Uint64Var(&l.stride, "stride", 389, "position step between consecutive writes (coprime to -blocks)")
	return l
}

func parse(fs *flag.FlagSet, args []string) (*layout, string, error) {
	l := layoutFlags(fs)
	if err := fs.Parse(args); err != nil {
		return nil, "", err
	}
	if fs.NArg() != 1 {
		return nil, "", fmt.Errorf("%s: want one PATH, got %d arguments", fs.Name(), fs.NArg())
	}
	return l, fs.Arg(0), l.validate()
}

func cmdWrite(args []string) error {
	fs := flag.NewFlagSet("write", flag.ContinueOnError)
	bs := fs.Int("bs", blockSize, "bytes per write: consecutive writes in one call (a multiple of 4096)")
	max := fs.Uint64("max", 0, "stop after this many block writes (0: at SIGTERM)")
	ready := fs.String("ready", "", "file created once the region is zeroed and the first writes are done")
	l, path, err := parse(fs, args)
	if err != nil {
		return err
	}
	if *bs <= 0 || *bs%blockSize != 0 || *bs > 1<<24 {
		return fmt.Errorf("-bs %d: want a multiple of 4096 up to 16 MiB", *bs)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	w, err := openWriter(path, l.n)
	if err != nil {
		return err
	}
	defer w.close()
	last, err := w.run(*l, uint64(*bs/blockSize), *max, *ready, stop)
	fmt.Printf("last=%d\n", last)
	return err
}

// writer writes blocks with O_DIRECT from a page-aligned buffer.
type writer struct {
	f    *os.File
	path string
	buf  []byte
}

func openWriter(path string, n uint64) (*writer, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_DIRECT, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s for direct writes: %w", path, err)
	}
	w := &writer{f: f, path: path}
	// An anonymous mapping is page-aligned, as O_DIRECT needs.
	w.buf, err = syscall.Mmap(-1, 0, 1<<24, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("map write buffer: %w", err)
	}
	return w, w.zero(n)
}

func (w *writer) close() {
	syscall.Munmap(w.buf)
	w.f.Close()
}

// zero writes zeros over the region (allocating it in a file), so that
// what an image holds at a position not yet written is known.
func (w *writer) zero(n uint64) error {
	chunk := uint64(len(w.buf)) / blockSize
	clear(w.buf)
	for p := uint64(0); p < n; p += chunk {
		k := min(chunk, n-p)
		if _, err := w.f.WriteAt(w.buf[:k*blockSize], int64(p*blockSize)); err != nil {
			return fmt.Errorf("zero %s at block %d: %w", w.path, p, err)
		}
	}
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", w.path, err)
	}
	return nil
}

// run writes blocks 1, 2, ... per in one call each (a call never wraps
// the region) until stop or max, and returns the last one written.
func (w *writer) run(l layout, per, max uint64, ready string, stop <-chan os.Signal) (uint64, error) {
	var s uint64
	for max == 0 || s < max {
		select {
		case <-stop:
			return s, nil
		default:
		}
		k := w.fill(l, s+1, per, max)
		if _, err := w.f.WriteAt(w.buf[:k*blockSize], int64(l.pos(s+1)*blockSize)); err != nil {
			return s, fmt.Errorf("write block %d of %s: %w", s+1, w.path, err)
		}
		s += k
		if ready != "" && s >= 16 {
			if err := os.WriteFile(ready, nil, 0o644); err != nil {
				return s, fmt.Errorf("create %s: %w", ready, err)
			}
			ready = ""
		}
	}
	return s, nil
}

// fill puts writes from..from+k-1 in the buffer, as many of per as land
// on consecutive positions, and returns k.
func (w *writer) fill(l layout, from, per, max uint64) uint64 {
	k := uint64(0)
	for k < per && (max == 0 || from+k <= max) {
		if k > 0 && l.pos(from+k) != l.pos(from)+k {
			break
		}
		block(w.buf[k*blockSize:(k+1)*blockSize], from+k, l.pos(from+k))
		k++
	}
	return k
}

func cmdCheck(args []string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	l, path, err := parse(fs, args)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	rep, err := check(f, *l)
	if err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	fmt.Print(rep)
	if !rep.ok() {
		return fmt.Errorf("%s is not one point in time of the writes (%d bad positions)", path, rep.bad)
	}
	return nil
}

// report is what check found: the cut, and the positions that do not
// hold what writes 1..cut leave there.
type report struct {
	cut, written, bad uint64
	lines             []string
}

func (r *report) ok() bool { return r.bad == 0 }

func (r *report) String() string {
	var b bytes.Buffer
	for _, l := range r.lines {
		fmt.Fprintln(&b, l)
	}
	state := "consistent"
	if !r.ok() {
		state = fmt.Sprintf("TORN: %d positions wrong", r.bad)
	}
	fmt.Fprintf(&b, "cut=%d written=%d %s\n", r.cut, r.written, state)
	return b.String()
}

func (r *report) wrong(p uint64, format string, a ...any) {
	r.bad++
	if len(r.lines) < 10 {
		r.lines = append(r.lines, fmt.Sprintf("position %d: ", p)+fmt.Sprintf(format, a...))
	}
}

// check reads the region of an image and compares every position with
// what writes 1..cut leave there, cut being the newest write found.
func check(img io.ReaderAt, l layout) (*report, error) {
	if err := l.validate(); err != nil {
		return nil, err
	}
	seqs, rep, err := scan(img, l)
	if err != nil {
		return nil, err
	}
	for p, s := range seqs {
		if want := l.latest(uint64(p), rep.cut); s != want && s != damaged {
			rep.wrong(uint64(p), "holds write %d, writes 1..%d leave write %d there", s, rep.cut, want)
		}
	}
	return rep, nil
}

// damaged marks a position whose block is no write at all.
const damaged = ^uint64(0)

// scan reads every block and returns the write each holds (0 for
// zeros), with the newest as the cut.
func scan(img io.ReaderAt, l layout) ([]uint64, *report, error) {
	rep := &report{}
	seqs := make([]uint64, l.n)
	b := make([]byte, blockSize)
	want := make([]byte, blockSize)
	for p := range seqs {
		if _, err := img.ReadAt(b, int64(p)*blockSize); err != nil {
			return nil, nil, fmt.Errorf("read block %d: %w", p, err)
		}
		s, err := decode(b, want, uint64(p))
		if err != nil {
			rep.wrong(uint64(p), "%v", err)
			seqs[p] = damaged
			continue
		}
		seqs[p] = s
		if s > 0 {
			rep.written++
		}
		rep.cut = max(rep.cut, s)
	}
	return seqs, rep, nil
}

var zeroBlock = make([]byte, blockSize)

// decode returns the write that block b at position p holds, 0 for a
// block of zeros, or an error for anything else (a torn block).
func decode(b, scratch []byte, p uint64) (uint64, error) {
	if bytes.Equal(b, zeroBlock) {
		return 0, nil
	}
	if string(b[:len(magic)]) != magic {
		return 0, errors.New("neither zeros nor a write (no header)")
	}
	s := binary.LittleEndian.Uint64(b[8:])
	if s == 0 || s == damaged {
		return 0, fmt.Errorf("header names write %d", s)
	}
	block(scratch, s, p)
	if !bytes.Equal(b, scratch) {
		return 0, fmt.Errorf("write %d is damaged or misplaced (its bytes differ from what it wrote at this position)", s)
	}
	return s, nil
}

func cmdTear(args []string) error {
	fs := flag.NewFlagSet("tear", flag.ContinueOnError)
	l, path, err := parse(fs, args)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	p, s, err := tear(f, *l)
	if err != nil {
		return fmt.Errorf("tear %s: %w", path, err)
	}
	fmt.Printf("position %d set back from write %d to %d\n", p, s, s-min(s, l.n))
	return nil
}

// tear sets one position of an image back by one write there (to zeros
// if it was its first), as a read that passed the position just before
// that write and read later positions after later writes would have:
// it picks the position holding the earliest write that has a later
// write after it.
func tear(img interface {
	io.ReaderAt
	io.WriterAt
}, l layout) (pos, was uint64, err error) {
	seqs, rep, err := scan(img, l)
	if err != nil {
		return 0, 0, err
	}
	if !rep.ok() || rep.written < 2 {
		return 0, 0, fmt.Errorf("needs a consistent image with two writes or more (has %d writes, %d bad positions)", rep.written, rep.bad)
	}
	pos, was = 0, damaged
	for p, s := range seqs {
		if s > 0 && s < was {
			pos, was = uint64(p), s
		}
	}
	b := make([]byte, blockSize)
	if was > l.n {
		block(b, was-l.n, pos)
	}
	if _, err := img.WriteAt(b, int64(pos)*blockSize); err != nil {
		return 0, 0, fmt.Errorf("write block %d: %w", pos, err)
	}
	return pos, was, nil
}
