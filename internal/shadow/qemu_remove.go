package shadow

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Removing what sauve added to a VM: the objects of this process once a
// backup is done or failed, and those of a process that died.

// removeLeftovers removes the jobs, exports, nodes, bitmaps and fd sets
// that a sauve process which no longer runs left in the VM.
func (q *QEMUBackup) removeLeftovers(ctx context.Context) error {
	alive := map[int]bool{q.pid: true}
	dead := func(name string) bool {
		pid := objOwner(name)
		if pid == 0 {
			return false
		}
		a, ok := alive[pid]
		if !ok {
			a = processRuns(pid)
			alive[pid] = a
		}
		return !a
	}
	lo := &leftovers{pids: map[int]bool{}}
	r := &remover{q: q}
	var jobs []qJob
	if err := q.c.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	for _, j := range jobs {
		if dead(j.ID) {
			r.job(ctx, j.ID)
			lo.add(j.ID, &lo.jobs)
		}
	}
	var exports []qExport
	if err := q.c.Execute(ctx, "query-block-exports", nil, &exports); err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	theirServer := false
	for _, e := range exports {
		if dead(e.ID) {
			theirServer = theirServer || strings.HasSuffix(e.ID, kindExportS)
			r.export(ctx, e.ID)
			lo.add(e.ID, &lo.exports)
		}
	}
	nodes, err := q.nodes(ctx)
	if err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	var names []string
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			if dead(b.Name) {
				r.bitmap(ctx, n.NodeName, b.Name)
				lo.add(b.Name, &lo.bitmaps)
			}
		}
		if dead(n.NodeName) {
			names = append(names, n.NodeName)
		}
	}
	// A fleecing node goes before the node of its file.
	sort.Slice(names, func(i, j int) bool {
		return strings.HasSuffix(names[i], kindFleece) && !strings.HasSuffix(names[j], kindFleece)
	})
	for _, n := range names {
		r.node(ctx, n)
		lo.add(n, &lo.nodes)
	}
	var sets []qFdset
	if err := q.c.Execute(ctx, "query-fdsets", nil, &sets); err != nil {
		return fmt.Errorf("VM %s: %w", q.label, err)
	}
	for _, s := range sets {
		for _, fd := range s.Fds {
			if dead(fd.Opaque) {
				r.fdset(ctx, s.ID)
				// A paused VM lists the fd sets removed while it was
				// paused (those of a sauve that ended well too) until it
				// runs: not said as left.
				if !q.stopped {
					lo.add(fd.Opaque, &lo.fdsets)
				}
				break
			}
		}
	}
	if theirServer {
		if err := q.c.Execute(ctx, "query-block-exports", nil, &exports); err == nil && len(exports) == 0 {
			r.stopServer(ctx)
			lo.server = true
		}
	}
	if len(lo.pids) > 0 {
		q.opts.Warn(fmt.Sprintf("VM %s: removed what a sauve that died left in it: %s", q.label, lo))
	}
	return r.err
}

// leftovers counts what removeLeftovers removed, for its warning.
type leftovers struct {
	pids                                  map[int]bool
	jobs, exports, bitmaps, nodes, fdsets int
	server                                bool
}

func (l *leftovers) add(name string, n *int) {
	l.pids[objOwner(name)] = true
	*n++
}

func (l *leftovers) String() string {
	var parts []string
	for _, c := range []struct {
		n    int
		what string
	}{{l.jobs, "job"}, {l.exports, "NBD export"}, {l.bitmaps, "bitmap"}, {l.nodes, "block node"}, {l.fdsets, "fd set"}} {
		switch {
		case c.n == 1:
			parts = append(parts, "1 "+c.what)
		case c.n > 1:
			parts = append(parts, fmt.Sprintf("%d %ss", c.n, c.what))
		}
	}
	if l.server {
		parts = append(parts, "its NBD server")
	}
	pids := make([]int, 0, len(l.pids))
	for p := range l.pids {
		pids = append(pids, p)
	}
	sort.Ints(pids)
	return fmt.Sprintf("%s (process %s)", strings.Join(parts, ", "), strings.Trim(fmt.Sprint(pids), "[]"))
}

// remover removes objects from the VM, keeping the first error and going
// on: what can be removed is.
type remover struct {
	q   *QEMUBackup
	err error
}

func (r *remover) fail(what string, err error) {
	if err != nil && r.err == nil {
		r.err = fmt.Errorf("VM %s: remove %s: %w", r.q.label, what, err)
	}
}

// job cancels a job (for sync=none, at once) and dismisses it.
func (r *remover) job(ctx context.Context, id string) {
	c := r.q.c
	err := poll(ctx, func() (bool, error) {
		var jobs []qJob
		if err := c.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
			return false, err
		}
		for _, j := range jobs {
			if j.ID != id {
				continue
			}
			var err error
			switch j.Status {
			case "concluded":
				err = c.Execute(ctx, "job-dismiss", map[string]any{"id": id}, nil)
			case "aborting", "waiting", "pending", "null":
			default:
				err = c.Execute(ctx, "block-job-cancel", map[string]any{"device": id, "force": true}, nil)
			}
			// Another goroutine may be removing it too.
			if isQMPError(err, "not found") || isQMPError(err, "not active") || isQMPError(err, "in state") {
				err = nil
			}
			return false, err
		}
		return true, nil
	})
	r.fail("job "+id, err)
}

// export removes an export, cutting its clients off, and waits until it
// is gone (removal is asynchronous), so that its node can be deleted.
func (r *remover) export(ctx context.Context, id string) {
	c := r.q.c
	err := c.Execute(ctx, "block-export-del", map[string]any{"id": id, "mode": "hard"}, nil)
	if err != nil && !isQMPError(err, "not found") && !isQMPError(err, "already shutting down") {
		r.fail("export "+id, err)
		return
	}
	r.fail("export "+id, poll(ctx, func() (bool, error) {
		var exports []qExport
		if err := c.Execute(ctx, "query-block-exports", nil, &exports); err != nil {
			return false, err
		}
		for _, e := range exports {
			if e.ID == id {
				return false, nil
			}
		}
		return true, nil
	}))
}

func (r *remover) bitmap(ctx context.Context, node, name string) {
	err := r.q.c.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": node, "name": name}, nil)
	r.fail("bitmap "+name, err)
}

// node removes a block node. A node that a job or export just let go of
// may still be held for a moment (QEMU drops the last references after
// the job's completion runs): blockdev-del is tried again until then.
func (r *remover) node(ctx context.Context, name string) {
	r.fail("node "+name, poll(ctx, func() (bool, error) {
		err := r.q.c.Execute(ctx, "blockdev-del", map[string]any{"node-name": name}, nil)
		switch {
		case err == nil || isQMPError(err, "Failed to find node"):
			return true, nil
		case isQMPError(err, "in use") || isQMPError(err, "busy"):
			return false, nil
		}
		return false, err
	}))
}

func (r *remover) fdset(ctx context.Context, id int) {
	r.fail(fmt.Sprintf("fd set %d", id), r.q.c.Execute(ctx, "remove-fd", map[string]any{"fdset-id": id}, nil))
}

func (r *remover) stopServer(ctx context.Context) {
	err := r.q.c.Execute(ctx, "nbd-server-stop", nil, nil)
	if err != nil && !isQMPError(err, "not running") {
		r.fail("the NBD server", err)
	}
}

// poll calls done until it reports true or fails, waiting a little more
// each time.
func poll(ctx context.Context, done func() (bool, error)) error {
	wait := 5 * time.Millisecond
	for {
		ok, err := done()
		if ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
}
