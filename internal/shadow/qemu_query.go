package shadow

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/sauve-backup/sauve/internal/qmp"
)

// What QEMU's query commands return, as far as sauve reads it.

type qBlock struct {
	Device   string     `json:"device"`
	QDev     string     `json:"qdev"`
	Inserted *qInserted `json:"inserted"`
}

type qInserted struct {
	NodeName string `json:"node-name"`
	RO       bool   `json:"ro"`
	Drv      string `json:"drv"`
	Image    struct {
		VirtualSize    int64 `json:"virtual-size"`
		FormatSpecific struct {
			Type string `json:"type"`
			Data struct {
				Compat string `json:"compat"`
			} `json:"data"`
		} `json:"format-specific"`
	} `json:"image"`
}

type qNode struct {
	NodeName string `json:"node-name"`
	Drv      string `json:"drv"`
	Image    struct {
		ActualSize int64 `json:"actual-size"`
	} `json:"image"`
	DirtyBitmaps []qBitmap `json:"dirty-bitmaps"`
}

type qBitmap struct {
	Name         string `json:"name"`
	Recording    bool   `json:"recording"`
	Persistent   bool   `json:"persistent"`
	Busy         bool   `json:"busy"`
	Inconsistent bool   `json:"inconsistent"`
}

type qJob struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	Error  string `json:"error"`
}

type qExport struct {
	ID string `json:"id"`
}

type qFdset struct {
	ID  int `json:"fdset-id"`
	Fds []struct {
		Opaque string `json:"opaque"`
	} `json:"fds"`
}

func (q *QEMUBackup) nodes(ctx context.Context) ([]qNode, error) {
	var nodes []qNode
	err := q.c.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes)
	return nodes, err
}

func (q *QEMUBackup) node(ctx context.Context, name string) (qNode, error) {
	nodes, err := q.nodes(ctx)
	if err != nil {
		return qNode{}, err
	}
	for _, n := range nodes {
		if n.NodeName == name {
			return n, nil
		}
	}
	return qNode{}, fmt.Errorf("VM %s has no block node %s", q.label, name)
}

// QEMUDrive is a drive of the VM that is backed up.
type QEMUDrive struct {
	// ID names the drive: its -drive id, else the id of the device
	// that has it, else its node name.
	ID string
	// Node is the node name of its top block node, which is read.
	Node string
	// Format is the top node's driver: "qcow2", "raw".
	Format string
	Size   int64
	// QDev is the QOM path of the device the drive is attached to.
	QDev string
}

// qdrive is a drive with what sauve needs to know of it.
type qdrive struct {
	QEMUDrive
	names    []string // what --drive may call it
	readOnly bool
	qcow2v2  bool
}

// driveID is the name by which a drive is shown: libvirt's drives
// (-blockdev with -device) have no drive id, their device has one.
func driveID(b qBlock) string {
	if b.Device != "" {
		return b.Device
	}
	dev := strings.TrimSuffix(strings.TrimPrefix(b.QDev, "/machine/peripheral/"), "/virtio-backend")
	if dev != "" && !strings.Contains(dev, "/") {
		return dev
	}
	if b.Inserted != nil && b.Inserted.NodeName != "" {
		return b.Inserted.NodeName
	}
	return b.QDev
}

// selectDrives picks the drives to back up: those named, or every
// writable drive with a medium (what is skipped is said).
func (q *QEMUBackup) selectDrives(ctx context.Context) error {
	var blocks []qBlock
	if err := q.c.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	all := make([]*qdrive, 0, len(blocks))
	for _, b := range blocks {
		d := &qdrive{QEMUDrive: QEMUDrive{ID: driveID(b), QDev: b.QDev}}
		d.names = []string{d.ID, b.Device, b.QDev}
		if in := b.Inserted; in != nil {
			d.Node, d.Format, d.Size, d.readOnly = in.NodeName, in.Drv, in.Image.VirtualSize, in.RO
			d.qcow2v2 = in.Image.FormatSpecific.Type == "qcow2" && in.Image.FormatSpecific.Data.Compat == "0.10"
			d.names = append(d.names, in.NodeName)
		}
		all = append(all, d)
		if len(q.opts.Drives) == 0 {
			if why := q.skip(ctx, b, d); why != "" {
				q.report.Skipped = append(q.report.Skipped, why)
				q.opts.Warn(why)
				continue
			}
			q.drives = append(q.drives, d)
		}
	}
	if len(q.opts.Drives) == 0 {
		if len(q.drives) == 0 {
			return fmt.Errorf("VM %s has no writable drive with a medium to back up", q.label)
		}
		return nil
	}
	return q.pickNamed(all)
}

// skip says why a drive is not backed up unless it is named.
func (q *QEMUBackup) skip(ctx context.Context, b qBlock, d *qdrive) string {
	what := "drive " + d.ID
	if b.QDev != "" {
		var typ string
		if err := q.c.Execute(ctx, "qom-get", map[string]any{"path": b.QDev, "property": "type"}, &typ); err == nil && strings.HasSuffix(typ, "-cd") {
			what += " (a CD-ROM)"
		}
	}
	switch {
	case b.Inserted == nil:
		return fmt.Sprintf("VM %s: %s has no medium: skipped", q.label, what)
	case d.readOnly:
		return fmt.Sprintf("VM %s: %s is read-only: skipped (name it with --drive to back it up)", q.label, what)
	}
	return ""
}

func (q *QEMUBackup) pickNamed(all []*qdrive) error {
	for _, want := range q.opts.Drives {
		var found *qdrive
		for _, d := range all {
			for _, n := range d.names {
				if n != "" && n == want {
					found = d
				}
			}
		}
		switch {
		case found == nil:
			ids := make([]string, len(all))
			for i, d := range all {
				ids[i] = d.ID
			}
			return fmt.Errorf("VM %s has no drive %s (it has: %s)", q.label, want, strings.Join(ids, ", "))
		case found.Node == "":
			return fmt.Errorf("VM %s: drive %s has no medium", q.label, found.ID)
		}
		dup := false
		for _, d := range q.drives {
			dup = dup || d == found
		}
		if !dup {
			q.drives = append(q.drives, found)
		}
	}
	return nil
}

// findAgent returns the socket of the guest agent's channel, "" when the
// VM seems to have none: the chardev libvirt or a user gives it is named
// after the agent's port (org.qemu.guest_agent.0) or "qga".
func (q *QEMUBackup) findAgent(ctx context.Context) (string, error) {
	return q.findChardev(ctx, func(path, label string) bool {
		return strings.Contains(path, "org.qemu.guest_agent") || strings.Contains(label, "qga") || strings.Contains(label, "guest_agent") || strings.Contains(label, "guest-agent")
	})
}

// SauveAgentPort is the virtio-serial port name of a sauve agent in a
// guest; a chardev named after it (or "sauve-agent") is its host side.
const SauveAgentPort = "org.sauve.agent.0"

// SauveAgent returns the host side (a unix socket) of the VM's sauve
// agent channel, "" when it has none.
func (q *QEMUBackup) SauveAgent(ctx context.Context) (string, error) {
	return q.findChardev(ctx, func(path, label string) bool {
		return strings.Contains(path, SauveAgentPort) || strings.Contains(label, "org.sauve.agent") || strings.Contains(label, "sauve-agent") || strings.Contains(label, "sauve_agent")
	})
}

// findChardev returns the socket path of the first unix-socket chardev
// that match accepts (by its path and lower-cased label).
func (q *QEMUBackup) findChardev(ctx context.Context, match func(path, label string) bool) (string, error) {
	var devs []struct {
		Label    string `json:"label"`
		Filename string `json:"filename"`
	}
	if err := q.c.Execute(ctx, "query-chardev", nil, &devs); err != nil {
		return "", fmt.Errorf("VM %s: %w", q.label, err)
	}
	for _, d := range devs {
		f := strings.TrimPrefix(d.Filename, "disconnected:")
		path, ok := strings.CutPrefix(f, "unix:")
		if !ok {
			continue
		}
		path, _, _ = strings.Cut(path, ",")
		if match(path, strings.ToLower(d.Label)) {
			return path, nil
		}
	}
	return "", nil
}

// isQMPError reports whether err is QEMU's refusal whose description
// contains part.
func isQMPError(err error, part string) bool {
	var qe *qmp.Error
	return errors.As(err, &qe) && strings.Contains(qe.Desc, part)
}
