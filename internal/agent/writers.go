package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/sauve-backup/sauve/internal/agent/writer"
)

// WriterStep is an application writer (PostgreSQL, MariaDB, hooks) as a
// step of a Chain, frozen before the filesystems so that the application
// has flushed when they freeze.
type WriterStep struct {
	W writer.Writer
	// Mounts, when set, are the filesystems the agent freezes: a writer
	// whose application needs a path on none of them is refused, since
	// the caller's copy of those would not restore it.
	Mounts []string
}

func (s WriterStep) Name() string { return "writer " + s.W.Name() }

func (s WriterStep) Record() (json.RawMessage, error) {
	return json.Marshal(struct {
		Writer string `json:"writer"`
	}{s.W.Name()})
}

// Recover does nothing: what a writer holds dies with the agent (a
// MySQL lock with its connection; CHECKPOINT holds nothing). A hook's
// post-thaw command does not run for an agent that died.
func (s WriterStep) Recover(context.Context, json.RawMessage) error { return nil }

// Freeze flushes and holds the application; a failed Freeze is thawed at
// once, since the chain thaws only the steps that froze.
func (s WriterStep) Freeze(ctx context.Context, window time.Duration) (Frozen, error) {
	if len(s.Mounts) > 0 {
		set := writer.Set{Writers: []writer.Writer{s.W}}
		if err := set.MissingVolume(ctx, writer.OnFilesystems(s.Mounts)); err != nil {
			return nil, err
		}
	}
	if err := s.W.Freeze(ctx); err != nil {
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), window)
		defer cancel()
		_ = s.W.Thaw(tctx)
		return nil, err
	}
	return writerFrozen{s.W}, nil
}

type writerFrozen struct{ w writer.Writer }

func (f writerFrozen) Report() FreezeReport {
	r := WriterReport{Name: f.w.Name()}
	if d, ok := f.w.(writer.Detailer); ok {
		r.Detail = d.Detail()
	}
	return FreezeReport{Writers: []WriterReport{r}}
}

func (f writerFrozen) Thaw(ctx context.Context) error { return f.w.Thaw(ctx) }
