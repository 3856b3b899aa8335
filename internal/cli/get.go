package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/fsread"
)

func newGetCmd(g *globals) *cobra.Command {
	var f fileFlags
	cmd := &cobra.Command{
		Use:   "get SNAPSHOT:PART/PATH... DEST",
		Short: "Copy files and trees out of a filesystem of a snapshot, without restoring it",
		Long: `Copy the files and folders named out of SNAPSHOT's filesystem into DEST, as
'cp -a' would: modes, owners (when run as root), access and modification
times, symlinks, hard links (within what is copied), sparse files (written
sparse), device files, FIFOs and extended attributes. Only the chunks the
files use are fetched. What the target cannot take (owners when not root,
attributes it refuses) is summed up in one line.

DEST is a folder to copy into, or, for one source and a DEST that does not
exist, the copy's name. DEST '-' writes one regular file to stdout.

Nothing is written outside DEST: names with '/' or '..' are refused,
symlinks are created as they are and never followed, an existing file is
not overwritten. PART and PATH are as in 'sauve ls'.`,
		Example: `  sauve get latest:1/etc/nginx /tmp/restore/
  sauve get latest:root/home/ann/report.odt latest:root/home/ann/notes ./back/
  sauve get 1a2b3c4d/var/log/syslog - | grep error`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageError{fmt.Errorf("%s: expects SNAPSHOT:PART/PATH... and DEST", cmd.CommandPath())}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			srcs, dest := args[:len(args)-1], args[len(args)-1]
			views := map[string]*fileView{}
			defer func() {
				for _, v := range views {
					v.Close()
				}
			}()
			open := func(s string) (*fileView, fileSpec, error) {
				spec := parseFileSpec(s)
				key := spec.snap + ":" + spec.part
				if v, ok := views[key]; ok {
					return v, spec, nil
				}
				v, err := g.openFiles(cmd.Context(), "get", spec, &f)
				if err != nil {
					return nil, spec, err
				}
				views[key] = v
				return v, spec, nil
			}
			if dest == "-" {
				if len(srcs) != 1 {
					return usageError{errors.New("get to stdout ('-') takes one file")}
				}
				v, spec, err := open(srcs[0])
				if err != nil {
					return err
				}
				fl, err := v.fs.Open(spec.path)
				if err != nil {
					return err
				}
				if _, err := io.Copy(g.stdout, io.NewSectionReader(fl, 0, fl.Size())); err != nil {
					return fmt.Errorf("get %s to stdout: %w", srcs[0], err)
				}
				return nil
			}
			x, err := newExtractor(dest, len(srcs))
			if err != nil {
				return err
			}
			defer x.root.Close()
			for _, s := range srcs {
				v, spec, err := open(s)
				if err != nil {
					return err
				}
				// Hard links are kept within each filesystem's files.
				if x.linksOf[v] == nil {
					x.linksOf[v] = map[uint64]string{}
				}
				x.fs, x.links = v.fs, x.linksOf[v]
				name := x.name
				if name == "" {
					name = path.Base(spec.path)
				}
				if spec.path == "/" && x.name == "" {
					name = "." // a filesystem's root: its content into DEST
				}
				if err := x.extract(spec.path, name, 0); err != nil {
					return err
				}
			}
			var fetched int64
			for _, v := range views {
				fetched += v.dr.Stats().BytesFetched
			}
			return g.getSummary(x, dest, fetched)
		},
	}
	f.add(cmd)
	return cmd
}

// extractor writes files read from a filesystem under root.
type extractor struct {
	fs      fileSystem
	root    *os.Root
	rootDir string
	name    string            // the copy's name when DEST does not exist
	links   map[uint64]string // inode → where it was extracted, for hard links
	linksOf map[*fileView]map[uint64]string
	asRoot  bool
	files   int
	bytes   int64
	failed  int
	// lost counts what could not be restored, by what.
	lost map[string]int
	errs []string
	// buf is the copy buffer of regular files, made once: 10 000 small
	// files must not allocate (and zero) a MiB each.
	buf []byte
}

func newExtractor(dest string, nsrc int) (*extractor, error) {
	x := &extractor{asRoot: os.Geteuid() == 0, lost: map[string]int{}, linksOf: map[*fileView]map[uint64]string{}}
	dir := dest
	if fi, err := os.Stat(dest); errors.Is(err, os.ErrNotExist) {
		if nsrc > 1 {
			if err := os.Mkdir(dest, 0o755); err != nil {
				return nil, fmt.Errorf("get: %w", err)
			}
		} else {
			dir, x.name = filepath.Dir(dest), filepath.Base(dest)
		}
	} else if err != nil {
		return nil, fmt.Errorf("get: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("get: %s exists and is not a folder (an existing file is not overwritten)", dest)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("get: %w", err)
	}
	x.root, x.rootDir = root, dir
	return x, nil
}

// safeName says whether a name read from the filesystem can be created
// as one entry of a folder.
func safeName(n string) bool {
	return n != "" && n != "." && n != ".." && !strings.ContainsAny(n, "/\x00")
}

func (x *extractor) fail(what string, err error) {
	x.failed++
	if len(x.errs) < 20 {
		x.errs = append(x.errs, fmt.Sprintf("%s: %v", what, err))
	}
}

// extract copies src (a path in x.fs) to rel (under x.root). Errors of
// one file are counted and the rest goes on; only a failure to read the
// filesystem's structure stops it.
func (x *extractor) extract(src, rel string, depth int) error {
	st, err := x.fs.Lstat(src)
	if err != nil {
		return err
	}
	if depth > 256 {
		return fmt.Errorf("%s: too deep (a directory loop in a damaged filesystem?)", src)
	}
	if st.Type() != fsread.TypeDir && st.Nlink > 1 {
		if first, ok := x.links[st.Ino]; ok {
			if err := x.root.Link(first, rel); err != nil {
				x.fail(src, err)
			}
			return nil
		}
	}
	full := filepath.Join(x.rootDir, rel)
	switch st.Type() {
	case fsread.TypeDir:
		if rel != "." {
			if err := x.root.Mkdir(rel, 0o700); err != nil {
				x.fail(src, err) // an existing name: its tree is skipped, never written through
				return nil
			}
		}
		ents, err := x.fs.ReadDir(src)
		if err != nil {
			return err
		}
		sort.Slice(ents, func(i, j int) bool { return ents[i].Name < ents[j].Name })
		for _, e := range ents {
			if !safeName(e.Name) {
				x.fail(path.Join(src, e.Name), errors.New("unsafe name, not extracted"))
				continue
			}
			if err := x.extract(path.Join(src, e.Name), filepath.Join(rel, e.Name), depth+1); err != nil {
				return err
			}
		}
		if rel == "." {
			return nil // DEST itself keeps its metadata
		}
		d, err := x.root.Open(rel)
		if err != nil {
			x.fail(src, err)
			return nil
		}
		x.fileMeta(src, st, d)
		d.Close()
		x.times(src, rel, st, false)
	case fsread.TypeRegular:
		if err := x.regular(src, rel, st); err != nil {
			x.fail(src, err)
			return nil
		}
	case fsread.TypeSymlink:
		t, err := x.fs.Readlink(src)
		if err == nil {
			err = x.root.Symlink(t, rel)
		}
		if err != nil {
			x.fail(src, err)
			return nil
		}
		if x.asRoot {
			if err := x.root.Lchown(rel, int(st.UID), int(st.GID)); err != nil {
				x.lose("owners", err)
			}
		} else {
			x.lose("owners (not root)", nil)
		}
		x.xattrs(src, func(n string, v []byte) error { return unix.Lsetxattr(full, n, v, 0) })
		x.times(src, rel, st, true)
	default: // devices, FIFOs, sockets
		dev := unix.Mkdev(st.Major, st.Minor)
		if err := unix.Mknod(full, st.Mode, int(dev)); err != nil {
			what := "device files, FIFOs and sockets"
			if !x.asRoot && (st.Type() == fsread.TypeChar || st.Type() == fsread.TypeBlock) {
				what = "device files (not root)"
			}
			x.lose(what, err)
			return nil
		}
		x.pathMeta(src, rel, full, st)
	}
	x.files++
	if st.Type() != fsread.TypeDir && st.Nlink > 1 {
		x.links[st.Ino] = rel
	}
	return nil
}

// regular writes a regular file: only its data ranges (holes stay
// holes), then its metadata.
func (x *extractor) regular(src, rel string, st fsread.Stat) error {
	fl, err := x.fs.Open(src)
	if err != nil {
		return err
	}
	data, err := fl.Data()
	if err != nil {
		return err
	}
	out, err := x.root.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if x.buf == nil {
		x.buf = make([]byte, 1<<20)
	}
	buf := x.buf
	for _, r := range data {
		for off := r.Start; off < r.End; {
			n := min(int64(len(buf)), r.End-off)
			if _, err := fl.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
				return err
			}
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += n
			x.bytes += n
		}
	}
	if err := out.Truncate(fl.Size()); err != nil {
		return err
	}
	x.fileMeta(src, st, out)
	if err := out.Close(); err != nil {
		return err
	}
	x.times(src, rel, st, false)
	return nil
}

func (x *extractor) lose(what string, err error) {
	if err != nil && errors.Is(err, unix.EPERM) && !x.asRoot {
		what += " (not root)"
	} else if err != nil && !strings.Contains(what, "(") {
		what += " (" + err.Error() + ")"
	}
	x.lost[what]++
}

// fileMeta sets owner, mode and xattrs through an open file: never
// through a path a symlink could redirect.
func (x *extractor) fileMeta(src string, st fsread.Stat, f *os.File) {
	if x.asRoot {
		if err := f.Chown(int(st.UID), int(st.GID)); err != nil {
			x.lose("owners", err)
		}
	} else if st.UID != uint32(os.Geteuid()) || st.GID != uint32(os.Getegid()) {
		x.lose("owners (not root)", nil)
	}
	// After chown, which clears set-user-ID.
	if err := unix.Fchmod(int(f.Fd()), st.Mode&0o7777); err != nil {
		x.lose("modes", err)
	}
	x.xattrs(src, func(n string, v []byte) error { return unix.Fsetxattr(int(f.Fd()), n, v, 0) })
}

// pathMeta sets the metadata of a special file we just made (it cannot
// be opened safely).
func (x *extractor) pathMeta(src, rel, full string, st fsread.Stat) {
	if x.asRoot {
		if err := x.root.Lchown(rel, int(st.UID), int(st.GID)); err != nil {
			x.lose("owners", err)
		}
	} else {
		x.lose("owners (not root)", nil)
	}
	if err := unix.Fchmodat(unix.AT_FDCWD, full, st.Mode&0o7777, 0); err != nil {
		x.lose("modes", err)
	}
	x.xattrs(src, func(n string, v []byte) error { return unix.Lsetxattr(full, n, v, 0) })
	x.times(src, rel, st, true)
}

func (x *extractor) xattrs(src string, set func(name string, v []byte) error) {
	xs, err := x.fs.Xattrs(src)
	if err != nil {
		x.fail(src+" (extended attributes)", err)
		return
	}
	for _, a := range xs {
		if err := set(a.Name, a.Value); err != nil {
			ns, _, _ := strings.Cut(a.Name, ".")
			x.lose("extended attributes "+ns+".*", err)
		}
	}
}

// times sets atime and mtime; nofollow for symlinks and special files.
func (x *extractor) times(src, rel string, st fsread.Stat, nofollow bool) {
	if !nofollow {
		if err := x.root.Chtimes(rel, st.Atime, st.Mtime); err != nil {
			x.lose("times", err)
		}
		return
	}
	ts := []unix.Timespec{unix.NsecToTimespec(st.Atime.UnixNano()), unix.NsecToTimespec(st.Mtime.UnixNano())}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(x.rootDir, rel), ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		x.lose("times of symlinks", err)
	}
}

func (g *globals) getSummary(x *extractor, dest string, fetched int64) error {
	var lost []string
	for what, n := range x.lost {
		lost = append(lost, fmt.Sprintf("%s: %d", what, n))
	}
	sort.Strings(lost)
	for _, e := range x.errs {
		g.warnf("not extracted: %s", e)
	}
	if g.json {
		if err := g.printJSON(map[string]any{"dest": dest, "files": x.files, "bytes": x.bytes, "bytes_fetched": fetched,
			"failed": x.failed, "not_restored": x.lost}); err != nil {
			return err
		}
	} else {
		line := fmt.Sprintf("%d files (%s of data) copied to %s, %s fetched", x.files, bytesIEC(x.bytes), dest, bytesIEC(fetched))
		if len(lost) > 0 {
			line += "; not restored: " + strings.Join(lost, ", ")
		}
		g.printf("%s\n", line)
	}
	if x.failed > 0 {
		return fmt.Errorf("get: %d files could not be extracted", x.failed)
	}
	return nil
}
