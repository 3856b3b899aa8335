// Command seqfile writes sequence-numbered files into a directory of a
// filesystem while a backup copies that filesystem, and checks the files
// that a copy of it holds: the guest-freeze test (TestGuestAgentFreezeInGuest,
// test/guest/guest-qga.sh) runs the writer in the guest and the check on
// the host, on the files of the restored image.
//
//	seqfile write [-keep N] [-pause D] [-state FILE] DIR
//	seqfile check DIR
//
// write makes files 1, 2, 3, ... one at a time, as an application that
// cares about its data does: file s is written whole under a temporary
// name (DIR/.tmp-S), fsync'ed, renamed to DIR/fNNNNNNNNNN (s in ten
// digits) and the rename made durable (fsync of DIR); then file s-keep is
// removed, so that DIR holds the last keep files, and s is recorded in
// FILE (written beside it and renamed over it: put it on a filesystem
// that no freeze stops, a tmpfs, so that it tells how far the writer got
// while the directory's filesystem is frozen). It writes until SIGTERM or
// SIGINT, finishing the file under way, and prints "last=S".
//
// File s holds the line "seqfile S LEN\n" and then LEN bytes that follow
// from s alone (LEN also follows from s): a file cut short, grown,
// zeroed, or holding another file's bytes is found by check.
//
// check exits 0 and prints "first=A last=B files=N tmp=T" when every
// fNNNNNNNNNN in DIR is whole and its own, they are A..B with none
// missing, and the only other file is at most one .tmp-(B+1), the file
// being written at the instant of the copy (whatever it holds); it
// prints what is wrong and exits 1 otherwise.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: seqfile write|check [flags] DIR")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "write":
		err = cmdWrite(os.Args[2:])
	case "check":
		err = cmdCheck(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q (write, check)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "seqfile:", err)
		os.Exit(1)
	}
}

// name is file s's name once complete.
func name(s uint64) string { return fmt.Sprintf("f%010d", s) }

// tmpName is file s's name while it is written.
func tmpName(s uint64) string { return ".tmp-" + strconv.FormatUint(s, 10) }

// size is the length of file s's body: 1 KiB to about 61 KiB.
func size(s uint64) int { return 1024 + int((s*2654435761)%(60<<10)) }

// content is file s: its header line and its body.
func content(s uint64) []byte {
	n := size(s)
	b := fmt.Appendf(nil, "seqfile %d %d\n", s, n)
	body := make([]byte, n)
	r := rand.New(rand.NewPCG(s, 0x5a17e5eedf11e5))
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			body[i+j] = byte(v >> (8 * j))
		}
	}
	return append(b, body...)
}

func cmdWrite(args []string) error {
	fs := flag.NewFlagSet("write", flag.ContinueOnError)
	keep := fs.Uint64("keep", 64, "files kept in DIR (older ones are removed)")
	pause := fs.Duration("pause", 0, "pause between two files")
	state := fs.String("state", "", "file that records the number of the last file made")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("write: one DIR")
	}
	if *keep == 0 {
		return errors.New("-keep 0: keep one file at least")
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	w := &writer{dir: fs.Arg(0), keep: *keep, state: *state}
	last, err := w.run(*pause, stop)
	fmt.Printf("last=%d\n", last)
	return err
}

type writer struct {
	dir   string
	keep  uint64
	state string
}

// run makes files until stop and returns the number of the last one.
func (w *writer) run(pause time.Duration, stop <-chan os.Signal) (uint64, error) {
	d, err := os.Open(w.dir)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	for s := uint64(1); ; s++ {
		select {
		case <-stop:
			return s - 1, nil
		default:
		}
		if err := w.make(d, s); err != nil {
			return s - 1, err
		}
		if pause > 0 {
			time.Sleep(pause)
		}
	}
}

// make makes file s durably, removes file s-keep and records s.
func (w *writer) make(dir *os.File, s uint64) error {
	tmp := filepath.Join(w.dir, tmpName(s))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(content(s))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("file %d: %w", s, err)
	}
	if err := os.Rename(tmp, filepath.Join(w.dir, name(s))); err != nil {
		return err
	}
	if err := dir.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", w.dir, err)
	}
	if s > w.keep {
		if err := os.Remove(filepath.Join(w.dir, name(s-w.keep))); err != nil {
			return err
		}
	}
	if w.state == "" {
		return nil
	}
	next := w.state + ".new"
	if err := os.WriteFile(next, []byte(strconv.FormatUint(s, 10)+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(next, w.state)
}

func cmdCheck(args []string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("check: one DIR")
	}
	r, err := check(fs.Arg(0))
	if err != nil {
		return err
	}
	fmt.Println(r)
	if len(r.wrong) > 0 {
		for _, w := range r.wrong {
			fmt.Println("wrong:", w)
		}
		os.Exit(1)
	}
	return nil
}

// report is what check found.
type report struct {
	first, last uint64 // of the complete files; 0, 0 when none
	files       int
	tmp         string // the file being written, "" none
	wrong       []string
}

func (r *report) String() string {
	tmp := r.tmp
	if tmp == "" {
		tmp = "none"
	}
	return fmt.Sprintf("first=%d last=%d files=%d tmp=%s", r.first, r.last, r.files, tmp)
}

func (r *report) bad(format string, a ...any) {
	if len(r.wrong) < 20 {
		r.wrong = append(r.wrong, fmt.Sprintf(format, a...))
	}
}

// check reads every file in dir.
func check(dir string) (*report, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	r := &report{}
	var seqs []uint64
	var tmps []string
	for _, e := range ents {
		n := e.Name()
		if strings.HasPrefix(n, ".tmp-") {
			tmps = append(tmps, n)
			continue
		}
		s, err := strconv.ParseUint(strings.TrimPrefix(n, "f"), 10, 64)
		if !strings.HasPrefix(n, "f") || err != nil || n != name(s) || !e.Type().IsRegular() {
			r.bad("%s: not a file of the writer", n)
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			return nil, err
		}
		if want := content(s); !bytes.Equal(b, want) {
			r.bad("%s: %s", n, differs(b, want))
		}
		seqs = append(seqs, s)
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	r.files = len(seqs)
	if len(seqs) > 0 {
		r.first, r.last = seqs[0], seqs[len(seqs)-1]
		if got := r.last - r.first + 1; got != uint64(len(seqs)) {
			r.bad("files %d..%d: %d of them missing", r.first, r.last, got-uint64(len(seqs)))
		}
	}
	switch {
	case len(tmps) > 1:
		r.bad("%d files being written: %s", len(tmps), strings.Join(tmps, " "))
	case len(tmps) == 1:
		r.tmp = tmps[0]
		if tmps[0] != tmpName(r.last+1) {
			r.bad("%s is being written, after file %d", tmps[0], r.last)
		}
	}
	return r, nil
}

// differs says how b differs from want.
func differs(b, want []byte) string {
	if len(b) != len(want) {
		return fmt.Sprintf("%d bytes, want %d", len(b), len(want))
	}
	for i := range b {
		if b[i] != want[i] {
			return fmt.Sprintf("byte %d is %#x, want %#x", i, b[i], want[i])
		}
	}
	return "equal"
}
