package shadow

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sauve-backup/sauve/internal/qmp"
)

// fillWatch follows the fleecing while the copies are read: the jobs'
// errors, and the growth of the fleecing images. QEMU 7.2's backup job
// fails the VM's writes when its image cannot grow (and QEMU then pauses
// the VM, by default), so once the images' filesystem has less than a
// margin left, the copies are given up: the jobs are cancelled, the VM
// writes on, and Verify says the copy is incomplete.
type fillWatch struct {
	q      *QEMUBackup
	sub    *qmp.Subscription
	dir    string
	margin int64
	done   chan struct{}

	// Under q.mu:
	filled string            // the drive whose image filled its filesystem
	errs   map[string]string // job id → error
}

// fillMargin is how much of FleeceDir's free space is kept free: an
// eighth, at most 1 GiB, for the writes between a threshold event and
// the cancelled job.
func fillMargin(avail int64) int64 { return min(avail/8, 1<<30) }

func available(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// startWatch subscribes to the events of the fleecing and sets the first
// write thresholds: each image may take its share of FleeceDir's free
// space, less the margin.
func (q *QEMUBackup) startWatch(ctx context.Context) error {
	w := &fillWatch{q: q, dir: q.opts.FleeceDir, done: make(chan struct{}), errs: map[string]string{}}
	avail, err := available(w.dir)
	if err != nil {
		return fmt.Errorf("fleecing images in %s: %w", w.dir, err)
	}
	w.margin = fillMargin(avail)
	w.sub = q.c.Subscribe("BLOCK_WRITE_THRESHOLD", "BLOCK_JOB_ERROR")
	q.watch = w
	go w.run()
	for _, f := range q.fleeces {
		if f.file == "" {
			continue
		}
		if err := w.arm(ctx, f, f.imageSize, avail); err != nil {
			return err
		}
	}
	return nil
}

// arm sets the image's write threshold at its share of what is free
// beyond pos, its end now.
func (w *fillWatch) arm(ctx context.Context, f *fleece, pos, avail int64) error {
	n := int64(len(w.q.watched()))
	share := max((avail-w.margin)/max(n, 1), 64<<10)
	err := w.q.c.Execute(ctx, "block-set-write-threshold", map[string]any{"node-name": f.file, "write-threshold": pos + share}, nil)
	if err != nil {
		return fmt.Errorf("VM %s: watch the fleecing image of drive %s: %w", w.q.label, f.d.ID, err)
	}
	return nil
}

// fillPoll is how often the watch also looks at the free space: a write
// threshold fires before the write it reports lands, so a threshold may
// be set on space that writes under way take.
const fillPoll = 100 * time.Millisecond

func (w *fillWatch) run() {
	defer close(w.done)
	tick := time.NewTicker(fillPoll)
	defer tick.Stop()
	for {
		select {
		case e, ok := <-w.sub.C:
			if !ok {
				return
			}
			w.event(e)
		case <-tick.C:
			if avail, err := available(w.dir); err == nil && avail <= w.margin {
				w.giveUp(nil, avail)
			}
		}
	}
}

func (w *fillWatch) event(e qmp.Event) {
	switch e.Name {
	case "BLOCK_WRITE_THRESHOLD":
		w.threshold(e.Data)
	case "BLOCK_JOB_ERROR":
		var d struct {
			Device    string `json:"device"`
			Operation string `json:"operation"`
		}
		if json.Unmarshal(e.Data, &d) == nil {
			w.q.mu.Lock()
			w.errs[d.Device] = "a " + d.Operation + " error"
			w.q.mu.Unlock()
		}
	}
}

// threshold handles a fleecing image that passed its threshold: while
// there is room, it gets a new one, half-way to the margin (the write
// that passed it has not landed yet); else every copy is given up.
func (w *fillWatch) threshold(data json.RawMessage) {
	var d struct {
		Node      string `json:"node-name"`
		Exceeded  int64  `json:"amount-exceeded"`
		Threshold int64  `json:"write-threshold"`
	}
	if json.Unmarshal(data, &d) != nil {
		return
	}
	var f *fleece
	for _, g := range w.q.watched() {
		if g.file == d.Node {
			f = g
		}
	}
	if f == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	avail, err := available(w.dir)
	if err == nil && avail > w.margin && w.arm(ctx, f, d.Threshold+d.Exceeded, w.margin+(avail-w.margin)/2) == nil {
		return
	}
	w.giveUp(f, avail)
}

// giveUp cancels every fleecing job, so that the VM's writes no longer
// wait for room in the images; f is the image that filled up (nil: the
// largest).
func (w *fillWatch) giveUp(f *fleece, avail int64) {
	q := w.q
	if f == nil {
		var most int64 = -1
		for _, g := range q.watched() {
			if u := g.usedNow(); u > most {
				f, most = g, u
			}
		}
		if f == nil {
			return
		}
	}
	q.mu.Lock()
	first := w.filled == ""
	if first {
		w.filled = f.d.ID
	}
	q.mu.Unlock()
	if !first {
		return
	}
	q.opts.Warn(fmt.Sprintf("VM %s: the fleecing images in %s have filled it (%d bytes free): the copies are given up so that the VM's writes go on", q.label, w.dir, avail))
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	r := &remover{q: q}
	for _, job := range q.jobs() {
		r.job(ctx, job)
	}
}

// watched returns the copies whose fleecing image is open in QEMU.
func (q *QEMUBackup) watched() []*fleece {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []*fleece
	for _, f := range q.fleeces {
		if f.file != "" {
			out = append(out, f)
		}
	}
	return out
}

// jobs returns the fleecing jobs that run.
func (q *QEMUBackup) jobs() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []string
	for _, f := range q.fleeces {
		if f.job != "" {
			out = append(out, f.job)
		}
	}
	return out
}

// stop ends the watch.
func (w *fillWatch) stop() {
	w.sub.Close()
	<-w.done
}

// broken says why the copy of f did not hold, "" when nothing went
// wrong that the watch saw.
func (w *fillWatch) broken(f *fleece) string {
	w.q.mu.Lock()
	defer w.q.mu.Unlock()
	if w.filled != "" {
		return fmt.Sprintf("the fleecing image of drive %s in %s filled up", w.filled, w.dir)
	}
	if e := w.errs[objName(w.q.pid, f.i, kindJob)]; e != "" {
		return fmt.Sprintf("the fleecing job of drive %s met %s", f.d.ID, e)
	}
	return ""
}
