package cli

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/sauve-backup/sauve/internal/overlay"
	"github.com/sauve-backup/sauve/internal/repo"
)

// overlayFlags are serve nbd's --writable and --overlay.
type overlayFlags struct {
	writable bool
	path     string
}

// open opens (or creates) the overlay of disk d of sn over dr: the file
// --overlay names (FILE.DISK when the snapshot has several disks), or a
// temporary one.
func (ov *overlayFlags) open(sn *repo.Snapshot, d *repo.Disk, dr *repo.DiskReader, several bool) (*overlay.Overlay, error) {
	path := ov.path
	if path == "" {
		f, err := os.CreateTemp(bigTempDir(), "sauve-overlay-"+sn.ID.Short()+"-*")
		if err != nil {
			return nil, fmt.Errorf("create a temporary overlay: %w", err)
		}
		path = f.Name()
		f.Close()
	} else if several {
		path += "." + d.Name
	}
	o, err := overlay.Open(path, sn.ID.String()+"/"+d.Name, d.Size, dr)
	if err != nil && ov.path == "" {
		os.Remove(path)
	}
	return o, err
}

func (ov *overlayFlags) describe(o *overlay.Overlay) string {
	if ov.path == "" {
		return fmt.Sprintf("the temporary overlay %s (deleted when the server stops; --overlay FILE keeps it)", o.Path())
	}
	if w := o.Written(); w > 0 {
		return fmt.Sprintf("the overlay %s (holding %s written before)", o.Path(), bytesIEC(w))
	}
	return fmt.Sprintf("the overlay %s", o.Path())
}

// closeOverlay flushes and closes o, and removes it when temporary.
func (g *globals) closeOverlay(o *overlay.Overlay, temporary bool) {
	if err := o.Close(); err != nil {
		g.warnf("%v", err)
	}
	if temporary {
		os.Remove(o.Path())
	}
}

// bigTempDir is where a file that may grow to gigabytes goes: /var/tmp,
// which is rarely in memory, unless TMPDIR says otherwise.
func bigTempDir() string {
	if os.Getenv("TMPDIR") == "" {
		if fi, err := os.Stat(filepath.Join("/var", "tmp")); err == nil && fi.IsDir() {
			return "/var/tmp"
		}
	}
	return os.TempDir()
}
