package shadow

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/source"
	"github.com/sauve-backup/sauve/internal/vdisk/qcow2"
)

// fleece is the copy of one drive and what was added to the VM for it;
// a name is set once its object exists, and cleared once it is removed.
type fleece struct {
	q *QEMUBackup
	d *qdrive
	i int

	fdset     int
	hasFdset  bool
	file      string // protocol node of the fleecing image
	node      string // qcow2 node of the fleecing image
	job       string
	temp      string // bitmap of the changes since the earlier backup
	export    string
	client    nbdExport
	imageSize int64 // the empty fleecing image's bytes

	gens     []generation // sauve's bitmaps on the drive, oldest first
	since    string       // the earlier backup's tracker
	newGen   string
	merge    []string
	fullRead string

	// Under q.mu:
	used     int64
	released bool
	result   error // Verify's, once released
}

// Views takes the copies, all at one instant: it freezes the guest's
// filesystems when it can, starts the fleecing of every drive and the
// bitmap generations in one transaction, thaws, and exports the copies
// over NBD. It is called once. On error, what it added to the VM is
// removed (the new bitmap generation is kept: it records the writes
// since the instant, which the next backup needs as no snapshot holds
// them).
func (q *QEMUBackup) Views(ctx context.Context) (views []*source.View, err error) {
	q.mu.Lock()
	if q.viewed || q.closed {
		q.mu.Unlock()
		return nil, errors.New("QEMU backup: Views is called once, before Close")
	}
	q.viewed = true
	q.mu.Unlock()
	defer func() {
		if err != nil {
			q.teardown()
		}
	}()
	nodes, err := q.nodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", q.label, err)
	}
	for i, d := range q.drives {
		f := &fleece{q: q, d: d, i: i, used: -1}
		q.mu.Lock()
		q.fleeces = append(q.fleeces, f)
		q.mu.Unlock()
		if !d.readOnly {
			if err := f.addImage(ctx); err != nil {
				return nil, err
			}
		}
		if err := f.planBitmaps(nodes); err != nil {
			return nil, err
		}
	}
	if err := q.startWatch(ctx); err != nil {
		return nil, err
	}
	if err := q.instant(ctx); err != nil {
		return nil, err
	}
	for _, f := range q.fleeces {
		if err := f.addTemp(ctx); err != nil {
			return nil, err
		}
	}
	if err := q.startNBD(ctx); err != nil {
		return nil, err
	}
	for _, f := range q.fleeces {
		v, err := f.exportView(ctx)
		if err != nil {
			return nil, err
		}
		if f.node == "" {
			v.CopyUsed = nil // a read-only drive is read as it is
		}
		views = append(views, v)
	}
	q.nbd.unlink()
	return views, nil
}

// openNameless opens a new file without a name in dir, so that nothing
// of it outlives the last process holding it.
func openNameless(dir string) (*os.File, error) {
	f, err := os.OpenFile(dir, os.O_RDWR|unix.O_TMPFILE, 0o600)
	if err == nil || !(errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR)) {
		return f, err
	}
	if f, err = os.CreateTemp(dir, ".sauve-fleece-*"); err != nil {
		return nil, err
	}
	return f, os.Remove(f.Name())
}

// addImage makes the drive's fleecing image, an empty qcow2 of the
// drive's size in FleeceDir, and opens it in QEMU with the drive as its
// backing.
func (f *fleece) addImage(ctx context.Context) error {
	q := f.q
	dir := q.opts.FleeceDir
	file, err := openNameless(dir)
	if err != nil {
		return fmt.Errorf("create the fleecing image of drive %s in %s: %w", f.d.ID, dir, err)
	}
	defer file.Close()
	w, err := qcow2.NewWriter(file, f.d.Size)
	if err == nil {
		err = w.Close()
	}
	var st os.FileInfo
	if err == nil {
		st, err = file.Stat()
	}
	if err != nil {
		return fmt.Errorf("write the fleecing image of drive %s in %s: %w", f.d.ID, dir, err)
	}
	f.imageSize = st.Size()
	var set struct {
		ID int `json:"fdset-id"`
	}
	if err := q.c.ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": objName(q.pid, f.i, kindFdset)}, &set, file); err != nil {
		return fmt.Errorf("VM %s: pass the fleecing image of drive %s: %w", q.label, f.d.ID, err)
	}
	f.fdset, f.hasFdset = set.ID, true
	name := objName(q.pid, f.i, kindFile)
	if err := q.c.Execute(ctx, "blockdev-add", map[string]any{"driver": "file", "node-name": name,
		"filename": fmt.Sprintf("/dev/fdset/%d", set.ID)}, nil); err != nil {
		return fmt.Errorf("VM %s: open the fleecing image of drive %s: %w", q.label, f.d.ID, err)
	}
	f.file = name
	name = objName(q.pid, f.i, kindFleece)
	if err := q.c.Execute(ctx, "blockdev-add", map[string]any{"driver": "qcow2", "node-name": name,
		"file": f.file, "backing": f.d.Node}, nil); err != nil {
		return fmt.Errorf("VM %s: open the fleecing image of drive %s: %w", q.label, f.d.ID, err)
	}
	f.node = name
	return nil
}

// planBitmaps decides the drive's bitmap generation and which earlier
// ones hold its changes, from nodes (the VM's block nodes now).
func (f *fleece) planBitmaps(nodes []qNode) error {
	q, d := f.q, f.d
	if !q.opts.Bitmaps {
		return nil
	}
	switch {
	case d.readOnly:
		f.fullRead = fmt.Sprintf("drive %s is read-only: QEMU keeps no dirty bitmap of it", d.ID)
	case d.Format != "qcow2":
		f.fullRead = fmt.Sprintf("drive %s is %s: persistent dirty bitmaps need qcow2", d.ID, d.Format)
	case d.qcow2v2:
		f.fullRead = fmt.Sprintf("drive %s is a qcow2 version 2 image (compat=0.10): persistent dirty bitmaps need version 3", d.ID)
	default:
		for _, n := range nodes {
			if n.NodeName == d.Node {
				f.gens = generations(n.DirtyBitmaps)
			}
		}
		var err error
		if f.newGen, err = newGeneration(time.Now(), f.gens); err != nil {
			return fmt.Errorf("name the bitmap of drive %s: %w", d.ID, err)
		}
		if q.opts.Since != nil {
			f.since = q.opts.Since(d.ID)
		}
		f.merge, f.fullRead = changesSince(f.gens, f.since, d.ID)
	}
	if f.fullRead != "" {
		q.mu.Lock()
		q.report.FullRead[d.ID] = f.fullRead
		q.mu.Unlock()
	}
	return nil
}

// actions are the fleecing's part of the transaction: the backup job,
// and the bitmap generations (the old ones stop, a new one starts).
func (f *fleece) actions() []any {
	var acts []any
	if f.node != "" {
		acts = append(acts, map[string]any{"type": "blockdev-backup", "data": map[string]any{
			"job-id": objName(f.q.pid, f.i, kindJob), "device": f.d.Node, "target": f.node,
			"sync": "none", "auto-dismiss": false}})
	}
	if f.newGen == "" {
		return acts
	}
	for _, g := range f.gens {
		if g.recording && g.consistent {
			acts = append(acts, map[string]any{"type": "block-dirty-bitmap-disable", "data": map[string]any{"node": f.d.Node, "name": g.name}})
		}
	}
	return append(acts, map[string]any{"type": "block-dirty-bitmap-add", "data": map[string]any{
		"node": f.d.Node, "name": f.newGen, "persistent": true, "granularity": bitmapGranularity}})
}

// instant runs the transaction that takes every copy, with the guest's
// filesystems frozen around it when they can be.
func (q *QEMUBackup) instant(ctx context.Context) error {
	var acts []any
	for _, f := range q.fleeces {
		acts = append(acts, f.actions()...)
	}
	if len(acts) == 0 {
		return nil
	}
	at := Instant{Provider: string(QEMU)}
	for _, d := range q.drives {
		at.Disks = append(at.Disks, d.ID)
	}
	return quiesce(ctx, q.opts.Quiesce, at, func() error { return q.transaction(ctx, acts) })
}

// transaction starts the copies of every drive in one QMP transaction,
// inside the guest agent's freeze when there is one.
func (q *QEMUBackup) transaction(ctx context.Context, acts []any) error {
	thaw, err := q.freezeGuest(ctx)
	if err != nil {
		return err
	}
	err = q.c.Execute(ctx, "transaction", map[string]any{"actions": acts}, nil)
	if err == nil {
		q.mu.Lock()
		for _, f := range q.fleeces {
			if f.node != "" {
				f.job = objName(q.pid, f.i, kindJob)
			}
		}
		q.mu.Unlock()
	}
	if thaw != nil {
		d, terr := thaw()
		q.mu.Lock()
		q.report.Frozen = d
		q.mu.Unlock()
		if terr != nil && err == nil {
			return fmt.Errorf("VM %s: thaw the guest's filesystems: %w", q.label, terr)
		}
	}
	if err != nil {
		return fmt.Errorf("VM %s: take the copies: %w", q.label, err)
	}
	return nil
}

// freezeGuest freezes the guest's filesystems through its agent, and
// returns how to thaw them; nil when there is no freeze (Report says
// why).
func (q *QEMUBackup) freezeGuest(ctx context.Context) (func() (time.Duration, error), error) {
	if q.opts.GuestFreeze == "off" || q.agent == "" {
		return nil, nil
	}
	thaw, err := q.freeze(ctx, q.agent, q.opts.FreezeTimeout)
	if err == nil {
		return thaw, nil
	}
	if q.opts.GuestFreeze == "on" {
		return nil, fmt.Errorf("guest freeze on: VM %s: %w", q.label, err)
	}
	why := fmt.Sprintf("VM %s: the guest agent froze nothing: %v", q.label, err)
	q.mu.Lock()
	q.report.NoFreeze = why
	q.mu.Unlock()
	q.opts.Warn(why + "; the copy is taken without a freeze")
	return nil, nil
}

// addTemp gathers the drive's changes since the earlier backup into one
// bitmap, which is exported with the copy.
func (f *fleece) addTemp(ctx context.Context) error {
	if len(f.merge) == 0 {
		return nil
	}
	q := f.q
	name := objName(q.pid, f.i, kindTemp)
	if err := q.c.Execute(ctx, "block-dirty-bitmap-add", map[string]any{"node": f.d.Node, "name": name,
		"granularity": bitmapGranularity, "persistent": false, "disabled": true}, nil); err != nil {
		return fmt.Errorf("VM %s: gather the changes of drive %s: %w", q.label, f.d.ID, err)
	}
	f.temp = name
	if err := q.c.Execute(ctx, "block-dirty-bitmap-merge", map[string]any{"node": f.d.Node, "target": name,
		"bitmaps": f.merge}, nil); err != nil {
		return fmt.Errorf("VM %s: gather the changes of drive %s: %w", q.label, f.d.ID, err)
	}
	return nil
}

// exportView exports the copy over NBD, connects to it and returns its
// view.
func (f *fleece) exportView(ctx context.Context) (*source.View, error) {
	q, d := f.q, f.d
	kind := kindExport
	if q.nbd.ours {
		kind = kindExportS
	}
	id := objName(q.pid, f.i, kind)
	node := f.node
	if node == "" {
		node = d.Node // read-only: the drive itself does not change
	}
	args := map[string]any{"type": "nbd", "id": id, "node-name": node, "name": id, "writable": false}
	metas := []string{"base:allocation"}
	if f.temp != "" {
		args["bitmaps"] = []string{f.temp}
		metas = append(metas, "qemu:dirty-bitmap:"+f.temp)
	}
	if err := q.c.Execute(ctx, "block-export-add", args, nil); err != nil {
		return nil, fmt.Errorf("VM %s: export the copy of drive %s: %w", q.label, d.ID, err)
	}
	f.export = id
	cl, err := q.dial(ctx, q.nbd.network, q.nbd.address, id, metas)
	if err != nil {
		return nil, fmt.Errorf("VM %s: read the copy of drive %s: %w", q.label, d.ID, err)
	}
	f.client = cl
	if cl.Size() != d.Size {
		return nil, fmt.Errorf("VM %s: the copy of drive %s has %d bytes, the drive %d", q.label, d.ID, cl.Size(), d.Size)
	}
	// The maps are read while the backup reads the view, after Views has
	// returned: they live as long as the client, which Release closes.
	mapCtx := context.WithoutCancel(ctx)
	src := &source.Source{Path: "qemu:" + q.opts.Socket + "#" + d.ID, Kind: source.Kind("qemu"), Size: d.Size}
	v := &source.View{Of: src, At: cl, Size: d.Size, Copy: string(QEMU), FullRead: f.fullRead,
		Data:     cl.Map(mapCtx, "base:allocation", func(flags uint32) bool { return flags&nbdStateZero == 0 }),
		Verify:   f.verify,
		CopyUsed: f.usedNow,
		Release:  f.release,
		// Each read waits a round trip through QEMU, which serves
		// several at once from its own threads.
		Readers: nbdReaders,
	}
	if f.newGen != "" {
		v.Tracker = TrackerPrefix + f.newGen
	}
	if f.temp != "" {
		v.Changes = &source.Changes{Since: f.since,
			Map: cl.Map(mapCtx, "qemu:dirty-bitmap:"+f.temp, func(flags uint32) bool { return flags&1 != 0 })}
	}
	return v, nil
}
