package shadow

import (
	"context"
	"errors"
	"fmt"
)

// verify is the view's Verify: the copy held if its job still runs,
// without error, and its image did not fill up.
func (f *fleece) verify() error {
	q := f.q
	q.mu.Lock()
	if f.released {
		err := f.result
		q.mu.Unlock()
		return err
	}
	q.mu.Unlock()
	return f.check()
}

func (f *fleece) check() error {
	q := f.q
	q.mu.Lock()
	job, node := f.job, f.node
	q.mu.Unlock()
	if node == "" && f.d.readOnly {
		return nil // exported as it is: nothing writes to it
	}
	incomplete := func(why string) error {
		return fmt.Errorf("%s: the copy of the instant is incomplete; nothing stored", why)
	}
	if why := q.watch.broken(f); why != "" {
		return incomplete(why)
	}
	if job == "" {
		return incomplete(fmt.Sprintf("the fleecing job of drive %s was stopped", f.d.ID))
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	var jobs []qJob
	if err := q.c.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
		return fmt.Errorf("VM %s: check the copy of drive %s: %w", q.label, f.d.ID, err)
	}
	for _, j := range jobs {
		if j.ID != job {
			continue
		}
		switch {
		case j.Error != "":
			return incomplete(fmt.Sprintf("the fleecing job of drive %s failed: %s", f.d.ID, j.Error))
		case j.Status == "running" || j.Status == "paused" || j.Status == "standby" || j.Status == "ready":
			return nil
		}
		return incomplete(fmt.Sprintf("the fleecing job of drive %s is %s", f.d.ID, j.Status))
	}
	return incomplete(fmt.Sprintf("the fleecing job of drive %s is gone (cancelled outside sauve?)", f.d.ID))
}

// usedNow is the view's CopyUsed: the bytes the fleecing image takes, -1
// when QEMU cannot say and they were never measured.
func (f *fleece) usedNow() int64 {
	q := f.q
	q.mu.Lock()
	file, used := f.file, f.used
	q.mu.Unlock()
	if file == "" {
		return used
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	n, err := q.node(ctx, file)
	if err != nil {
		return used
	}
	q.mu.Lock()
	f.used = max(f.used, n.Image.ActualSize)
	used = f.used
	q.mu.Unlock()
	return used
}

// release is the view's Release: once the copy is read, it is checked
// (Verify then returns what was found) and removed from the VM, so that
// its image stops growing.
func (f *fleece) release() error {
	q := f.q
	q.mu.Lock()
	if f.released {
		q.mu.Unlock()
		return nil
	}
	q.mu.Unlock()
	result := f.check()
	q.mu.Lock()
	f.released, f.result = true, result
	q.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return f.teardown(ctx)
}

// teardown removes what was added to the VM for the copy, in the order
// in which each piece stops being used. It may be called again after a
// failure: what is gone is not removed twice.
func (f *fleece) teardown(ctx context.Context) error {
	q := f.q
	r := &remover{q: q}
	if f.client != nil {
		r.fail("the NBD connection of drive "+f.d.ID, f.client.Close())
		f.client = nil
	}
	drop := func(p *string) {
		if r.err == nil {
			q.mu.Lock()
			*p = ""
			q.mu.Unlock()
		}
	}
	if f.export != "" {
		r.export(ctx, f.export)
		drop(&f.export)
	}
	q.mu.Lock()
	job := f.job
	q.mu.Unlock()
	if job != "" {
		r.job(ctx, job)
		drop(&f.job)
	}
	if f.temp != "" {
		r.bitmap(ctx, f.d.Node, f.temp)
		drop(&f.temp)
	}
	if f.file != "" {
		f.usedNow()
	}
	if f.node != "" && r.err == nil {
		r.node(ctx, f.node)
		drop(&f.node)
	}
	if f.file != "" && r.err == nil {
		r.node(ctx, f.file)
		drop(&f.file)
	}
	if f.hasFdset && r.err == nil {
		r.fdset(ctx, f.fdset)
		f.hasFdset = r.err != nil
	}
	return r.err
}

// teardown removes every copy and the NBD server sauve started.
func (q *QEMUBackup) teardown() error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if q.watch != nil {
		q.watch.stop()
	}
	var errs []error
	q.mu.Lock()
	fleeces := q.fleeces
	q.mu.Unlock()
	for _, f := range fleeces {
		q.mu.Lock()
		if !f.released {
			f.released, f.result = true, errors.New("the copy was removed before it was verified")
		}
		q.mu.Unlock()
		errs = append(errs, f.teardown(ctx))
	}
	if q.nbd != nil {
		errs = append(errs, q.nbd.stop(ctx, q))
	}
	return errors.Join(errs...)
}

// Commit retires the bitmap generations older than this backup's, once
// its snapshot is stored: the next backup reads what changed since this
// one. Call it before Close. Without it (a backup that failed), the old
// generations stay, and the next backup merges them all.
func (q *QEMUBackup) Commit(ctx context.Context) error {
	q.mu.Lock()
	closed := q.closed
	q.mu.Unlock()
	if closed {
		return errors.New("QEMU backup: Commit after Close")
	}
	nodes, err := q.nodes(ctx)
	if err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	r := &remover{q: q}
	for _, f := range q.fleeces {
		if f.newGen == "" {
			continue
		}
		for _, n := range nodes {
			if n.NodeName != f.d.Node {
				continue
			}
			for _, g := range generations(n.DirtyBitmaps) {
				if g.name < f.newGen {
					r.bitmap(ctx, f.d.Node, g.name)
				}
			}
		}
	}
	return r.err
}

// Close removes what the backup added to the VM (jobs, exports, the NBD
// server it started, fleecing images, temporary bitmaps) and disconnects.
// It is called after a failure too, and may be called more than once.
func (q *QEMUBackup) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	q.mu.Unlock()
	if gone := q.c.Err(); gone != nil {
		// QEMU went away, or the monitor broke: what is left in a VM
		// that runs on is the next backup's to remove.
		if q.nbd != nil {
			q.nbd.unlink()
		}
		if q.watch != nil {
			q.watch.stop()
		}
		for _, f := range q.fleeces {
			if f.client != nil {
				f.client.Close()
			}
		}
		return fmt.Errorf("VM %s: the copies cannot be removed: %w", q.label, gone)
	}
	err := q.teardown()
	q.c.Close()
	if err != nil {
		return fmt.Errorf("VM %s: remove the copies: %w", q.label, err)
	}
	return nil
}
