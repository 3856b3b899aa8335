package shadow

// The QEMU provider reads a running VM's drives as they were at one
// instant, through fleecing: for each drive, a qcow2 overlay (the
// fleecing image) whose backing is the drive, and a backup job with
// sync=none that copies into it, before the VM overwrites them, the
// blocks the VM writes. The overlay reads as the drive was when the job
// started; all the jobs start in one QMP transaction, so the drives are
// taken together. QEMU exports each overlay over NBD, which sauve reads.
//
// On QEMU 7.2 a copy-before-write filter cannot be inserted in a
// transaction, so the backup job's own filter is used; it fails the VM's
// writes when the fleecing image cannot grow. To spare the VM, sauve
// watches the fleecing images' growth (write thresholds) and gives the
// copy up before their filesystem is full: the backup then fails, the
// VM runs on.
//
// Everything sauve adds to the VM is named after its process id
// (sauve-P<pid>-...), so that what a dead sauve left is found and removed
// by the next one; the fleecing images are files without a name (passed
// to QEMU as file descriptors), so that nothing is left on disk.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sauve-backup/sauve/internal/qmp"
)

// QEMUOptions say which VM to back up and how.
type QEMUOptions struct {
	// Socket is the VM's QMP socket.
	Socket string
	// Drives names the drives to back up: drive ids, device ids or node
	// names. Empty: every writable drive with a medium (CD-ROMs and other
	// read-only drives are skipped, and said).
	Drives []string
	// GuestFreeze is "auto" (freeze the guest's filesystems through its
	// guest agent when the VM has one), "on" (fail without one) or "off".
	// Empty is auto.
	GuestFreeze string
	// GuestAgent is the guest agent's socket; "" finds it among the VM's
	// chardevs.
	GuestAgent string
	// FleeceDir is where the fleecing images grow ("" = os.TempDir()).
	FleeceDir string
	// NBDServer is the address ("unix:/path", "/path" or "host:port") of
	// the NBD server the VM already runs, on which sauve then exports its
	// copies; "" starts one (the VM must not run one already).
	NBDServer string
	// Since returns the Tracker that the previous snapshot's disk of a
	// drive (by QEMUDrive.ID) recorded, "" when none (a full read).
	Since func(drive string) string
	// Bitmaps keeps persistent dirty bitmaps on qcow2 drives, so that the
	// next backup reads only what was written since this one.
	Bitmaps bool
	// FreezeTimeout bounds the guest freeze (DefaultFreezeTimeout when 0).
	FreezeTimeout time.Duration
	Warn          func(string)
	// Quiesce, when set, holds applications still around the instant
	// (an agent in the guest, hooks): before the guest agent's freeze,
	// and thawed after its thaw.
	Quiesce Quiescer
}

// QEMUBackup is one backup of a running QEMU VM: OpenQEMU, Views, read
// the views, Verify each, store, Commit, Close.
type QEMUBackup struct {
	opts   QEMUOptions
	c      *qmp.Client
	pid    int
	uuid   string
	name   string
	label  string // the VM in messages
	drives []*qdrive
	agent  string // guest agent socket, "" none
	// stopped says the VM's CPUs are stopped (paused): QEMU then keeps
	// the file descriptors of removed fd sets open until it runs again.
	stopped bool
	// freeze freezes the guest's filesystems (guestFreeze; tests replace
	// it).
	freeze func(ctx context.Context, socket string, timeout time.Duration) (func() (time.Duration, error), error)
	// dial connects to an export (dialExport).
	dial func(ctx context.Context, network, address, export string, metas []string) (nbdExport, error)

	mu      sync.Mutex
	report  QEMUReport
	viewed  bool
	fleeces []*fleece
	nbd     *nbdServer
	watch   *fillWatch
	closed  bool
}

// QEMUReport says what a backup of a VM did, for its output.
type QEMUReport struct {
	// Frozen is how long the guest's filesystems were frozen; 0 when
	// they were not, and NoFreeze says why.
	Frozen   time.Duration
	NoFreeze string
	// FleeceUsed is the space the fleecing images took, in bytes, at the
	// end of the backup (sum over the drives).
	FleeceUsed int64
	// FullRead maps the drives read in full despite Bitmaps to why.
	FullRead map[string]string
	// Skipped says which drives were not backed up, and why.
	Skipped []string
}

// OpenQEMU connects to the VM's monitor, checks that its QEMU can make
// fleecing copies, removes what an earlier sauve that died left in it
// (said through Warn), and picks the drives to back up. It changes
// nothing else in the VM.
func OpenQEMU(ctx context.Context, o QEMUOptions) (*QEMUBackup, error) {
	if o.Warn == nil {
		o.Warn = func(string) {}
	}
	if o.FreezeTimeout <= 0 {
		o.FreezeTimeout = DefaultFreezeTimeout
	}
	if o.FleeceDir == "" {
		o.FleeceDir = os.TempDir()
	}
	switch o.GuestFreeze {
	case "":
		o.GuestFreeze = "auto"
	case "auto", "on", "off":
	default:
		return nil, fmt.Errorf("guest freeze %q: choose auto, on or off", o.GuestFreeze)
	}
	c, err := qmp.Dial(ctx, o.Socket)
	if err != nil {
		return nil, err
	}
	q := &QEMUBackup{opts: o, c: c, pid: os.Getpid(), label: o.Socket, freeze: guestFreeze, dial: dialAgreed,
		report: QEMUReport{FullRead: map[string]string{}}}
	if err := q.open(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *QEMUBackup) open(ctx context.Context) error {
	if v := q.c.Version(); !v.AtLeast(7, 0) {
		return fmt.Errorf("QEMU %d.%d at %s is too old for fleecing (7.0 or newer)", v.Major, v.Minor, q.opts.Socket)
	}
	var uuid struct{ UUID string }
	var name struct{ Name string }
	if err := q.c.Execute(ctx, "query-uuid", nil, &uuid); err != nil {
		return fmt.Errorf("VM at %s: %w", q.opts.Socket, err)
	}
	if err := q.c.Execute(ctx, "query-name", nil, &name); err != nil {
		return fmt.Errorf("VM at %s: %w", q.opts.Socket, err)
	}
	q.uuid, q.name = uuid.UUID, name.Name
	if q.name != "" {
		q.label = q.name
	}
	var st struct {
		Status  string
		Running bool
	}
	if err := q.c.Execute(ctx, "query-status", nil, &st); err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	q.stopped = !st.Running
	switch st.Status {
	case "inmigrate", "postmigrate", "finish-migrate", "shutdown", "guest-panicked":
		return fmt.Errorf("VM %s is in state %s: its drives cannot be copied now", q.label, st.Status)
	}
	if err := q.removeLeftovers(ctx); err != nil {
		return err
	}
	if err := q.selectDrives(ctx); err != nil {
		return err
	}
	return q.pickAgent(ctx)
}

// SetQuiesce sets Options.Quiesce after OpenQEMU (the caller may learn
// of an agent from the VM), before Views; quiescing through an agent in
// the guest turns off the guest agent's freeze under auto, since a second
// FIFREEZE of a filesystem fails.
func (q *QEMUBackup) SetQuiesce(z Quiescer, byGuestAgent bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.opts.Quiesce = z
	if byGuestAgent && q.opts.GuestFreeze != "on" {
		q.opts.GuestFreeze = "off"
		q.report.NoFreeze = "the sauve agent in the guest freezes it"
	}
}

// pickAgent finds the guest agent that the freeze needs.
func (q *QEMUBackup) pickAgent(ctx context.Context) error {
	switch {
	case q.opts.GuestFreeze == "off":
		q.report.NoFreeze = "guest freeze off"
		return nil
	case q.opts.GuestAgent != "":
		q.agent = q.opts.GuestAgent
		return nil
	}
	path, err := q.findAgent(ctx)
	if err != nil {
		return err
	}
	if path == "" {
		if q.opts.GuestFreeze == "on" {
			return fmt.Errorf("guest freeze on: VM %s has no guest agent channel (name its socket with the guest agent option)", q.label)
		}
		q.report.NoFreeze = fmt.Sprintf("VM %s has no guest agent channel", q.label)
	}
	q.agent = path
	return nil
}

// VM returns the VM's UUID and name (either may be empty).
func (q *QEMUBackup) VM() (uuid, name string) { return q.uuid, q.name }

// QMP is the VM's monitor, for the queries of other packages (what the
// machine is made of).
func (q *QEMUBackup) QMP() *qmp.Client { return q.c }

// Drives returns the drives backed up, in the order of the views.
func (q *QEMUBackup) Drives() []QEMUDrive {
	out := make([]QEMUDrive, len(q.drives))
	for i, d := range q.drives {
		out[i] = d.QEMUDrive
	}
	return out
}

// Report returns what the backup did so far.
func (q *QEMUBackup) Report() QEMUReport {
	q.mu.Lock()
	defer q.mu.Unlock()
	r := q.report
	r.FullRead = make(map[string]string, len(q.report.FullRead))
	for k, v := range q.report.FullRead {
		r.FullRead[k] = v
	}
	r.Skipped = append([]string(nil), q.report.Skipped...)
	fleeces := q.fleeces
	q.mu.Unlock()
	for _, f := range fleeces {
		r.FleeceUsed += max(f.usedNow(), 0)
	}
	q.mu.Lock()
	return r
}

// objName names what this process adds to the VM: the i-th drive's
// object of a kind. Node names have at most 31 bytes.
func objName(pid, i int, kind string) string { return fmt.Sprintf("sauve-P%d-%d%s", pid, i, kind) }

// The kinds of objName.
const (
	kindFile     = "p" // the fleecing image's protocol node
	kindFleece   = "f" // the fleecing image's qcow2 node
	kindJob      = "j" // the backup job
	kindExport   = "e" // the NBD export on a server sauve did not start
	kindExportS  = "s" // the NBD export on the server sauve started
	kindTemp     = "t" // the bitmap of the changes, exported
	kindFdset    = "d" // the fleecing image's file descriptor
	kindListener = "l" // the NBD server's listening socket (getfd)
)

// objOwner returns the process id in a name objName made, 0 when it is
// not one.
func objOwner(name string) int {
	rest, ok := strings.CutPrefix(name, "sauve-P")
	if !ok {
		return 0
	}
	pid := 0
	for i, r := range rest {
		switch {
		case r >= '0' && r <= '9' && i < 10:
			pid = pid*10 + int(r-'0')
		case r == '-' && i > 0:
			return pid
		default:
			return 0
		}
	}
	return 0
}

// processRuns reports whether a process pid exists: one that does is
// never taken for dead, whoever it is.
func processRuns(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// callTimeout bounds the QMP calls of the methods without a context
// (Verify, CopyUsed, Release, Close).
const callTimeout = 30 * time.Second
