// Package repair stores again the chunks a repository has lost, read from
// healthy sources (the disk itself, an image of it, another repository's
// snapshot of it), and records in the owner's ledger what no source could
// give back, so that the damaged snapshots are marked. A chunk is accepted
// from a source only if its ID is the lost one: a source can fill a hole,
// never change a byte.
package repair

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/sauve-backup/sauve/internal/repo"
)

// Source is something lost chunks may still be read from, at the offsets
// the snapshots had them.
type Source struct {
	// Name says what it is, in reports.
	Name string
	R    io.ReaderAt
	Size int64
	// Disk and Path, when set, restrict the source to lost chunks of
	// disks with this name or source path (another repository's snapshot
	// of a disk); empty, it is tried for every lost chunk.
	Disk, Path string
}

func (s Source) serves(l repo.LostChunk) bool {
	if s.Disk == "" && s.Path == "" {
		return true
	}
	return (s.Disk != "" && s.Disk == l.Disk) || (s.Path != "" && s.Path == l.Source)
}

// Repository is what repair needs of the repository it repairs.
type Repository interface {
	LostChunks(ctx context.Context, opts repo.CheckOptions) (*repo.CheckReport, []repo.LostChunk, []repo.LostList, error)
	ChunkID(data []byte) repo.ID
	WithWriter(ctx context.Context, purpose string, fn func(w *repo.Writer) error) (repo.WriteStats, error)
	SaveLedger(ctx context.Context, events []repo.LedgerEvent) error
	Ledger(ctx context.Context) (*repo.Ledger, error)
}

// Options tune Snapshots.
type Options struct {
	// DryRun finds what could be recovered and stores nothing.
	DryRun bool
	// ReadData reads every pack to find the lost chunks (see check
	// --read-data); without it, chunks whose copies are all in missing,
	// truncated or recorded-damaged packs count as lost.
	ReadData bool
	Sources  []Source
	// Progress is called with lost chunks done and their count.
	Progress func(done, total int)
}

// Report says what Snapshots did.
type Report struct {
	DryRun bool `json:"dry_run"`
	// Lost counts distinct lost chunks, Recovered those stored again
	// (or, with DryRun, that a source holds).
	Lost      int `json:"lost_chunks"`
	Recovered int `json:"recovered_chunks"`
	// From counts chunks recovered per source.
	From map[string]int `json:"recovered_from"`
	// Damaged are the stretches of snapshots still lost: recorded in the
	// ledger (unless DryRun), so that those snapshots are marked.
	Damaged []repo.Damage `json:"still_damaged"`
	// LostLists are stretches whose chunk list is lost: no source can
	// give them back, since which chunks they held is unknown.
	LostLists []repo.LostList `json:"lost_chunk_lists"`
	// Whole are snapshots recorded as damaged before that are whole now.
	Whole []repo.ID `json:"whole_again"`
}

// Snapshots recovers what it can of the repository's lost chunks from the
// sources, and records the rest.
func Snapshots(ctx context.Context, r Repository, opts Options) (*Report, error) {
	_, lost, lists, err := r.LostChunks(ctx, repo.CheckOptions{ReadData: opts.ReadData})
	if err != nil {
		return nil, err
	}
	rep := &Report{DryRun: opts.DryRun, From: map[string]int{}, Damaged: []repo.Damage{}, LostLists: lists, Whole: []repo.ID{}}
	byID := map[repo.ID][]repo.LostChunk{}
	var order []repo.ID
	for _, l := range lost {
		if _, ok := byID[l.ID]; !ok {
			order = append(order, l.ID)
		}
		byID[l.ID] = append(byID[l.ID], l)
	}
	rep.Lost = len(order)
	recovered, err := recoverChunks(ctx, r, opts, order, byID, rep)
	if err != nil {
		return nil, err
	}
	var still []repo.LostChunk
	for _, l := range lost {
		if !recovered[l.ID] {
			still = append(still, l)
		}
	}
	rep.Damaged = damages(still, lists)
	if opts.DryRun {
		return rep, nil
	}
	return rep, record(ctx, r, rep)
}

// recoverChunks reads each lost chunk from the sources until one gives it
// back, and stores it (in one write session, unless DryRun).
func recoverChunks(ctx context.Context, r Repository, opts Options, order []repo.ID, byID map[repo.ID][]repo.LostChunk, rep *Report) (map[repo.ID]bool, error) {
	if len(opts.Sources) == 0 || len(order) == 0 {
		return map[repo.ID]bool{}, nil
	}
	if opts.DryRun {
		return scan(ctx, r, opts, order, byID, rep, nil)
	}
	var recovered map[repo.ID]bool
	_, err := r.WithWriter(ctx, "repair snapshots", func(w *repo.Writer) error {
		var err error
		recovered, err = scan(ctx, r, opts, order, byID, rep, w)
		return err
	})
	return recovered, err
}

// scan finds each lost chunk in the sources and stores what it finds with
// w (nil: stores nothing).
func scan(ctx context.Context, r Repository, opts Options, order []repo.ID, byID map[repo.ID][]repo.LostChunk, rep *Report, w *repo.Writer) (map[repo.ID]bool, error) {
	recovered := map[repo.ID]bool{}
	buf := make([]byte, 0, repo.MaxChunkSize)
	for i, id := range order {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, src, err := find(r, id, byID[id], opts.Sources, buf)
		if err != nil {
			return nil, err
		}
		if data != nil {
			if w != nil {
				if _, err := w.SaveBlob(ctx, repo.DataBlob, id, data); err != nil {
					return nil, fmt.Errorf("store recovered chunk %s: %w", id.Short(), err)
				}
			}
			recovered[id] = true
			rep.Recovered++
			rep.From[src]++
		}
		if opts.Progress != nil {
			opts.Progress(i+1, len(order))
		}
	}
	return recovered, nil
}

// find returns the bytes of lost chunk id from the first source that holds
// them at one of the places it was lost, and that source's name.
func find(r Repository, id repo.ID, places []repo.LostChunk, sources []Source, buf []byte) ([]byte, string, error) {
	for _, l := range places {
		for _, s := range sources {
			if !s.serves(l) || l.Offset+int64(l.Length) > s.Size {
				continue
			}
			b := buf[:l.Length]
			n, err := s.R.ReadAt(b, l.Offset)
			if n < l.Length {
				if err != nil && !errors.Is(err, io.EOF) && ctxErr(err) {
					return nil, "", err
				}
				continue // unreadable there: try the next source
			}
			if r.ChunkID(b) == id {
				return b, s.Name, nil
			}
		}
	}
	return nil, "", nil
}

func ctxErr(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// damages groups what is still lost by snapshot and disk, as byte ranges.
func damages(still []repo.LostChunk, lists []repo.LostList) []repo.Damage {
	type key struct {
		sn   repo.ID
		disk string
	}
	spans := map[key][]repo.Span{}
	chunks := map[key]int64{}
	for _, l := range still {
		k := key{l.Snapshot, l.Disk}
		spans[k] = append(spans[k], repo.Span{Offset: l.Offset, Length: int64(l.Length)})
		chunks[k]++
	}
	for _, l := range lists {
		k := key{l.Snapshot, l.Disk}
		spans[k] = append(spans[k], l.Span)
		chunks[k]++
	}
	var out []repo.Damage
	for k, ss := range spans {
		slices.SortFunc(ss, func(a, b repo.Span) int { return int(a.Offset - b.Offset) })
		var merged []repo.Span
		for _, s := range ss {
			if n := len(merged); n > 0 && merged[n-1].Offset+merged[n-1].Length >= s.Offset {
				merged[n-1].Length = max(merged[n-1].Length, s.Offset+s.Length-merged[n-1].Offset)
				continue
			}
			merged = append(merged, s)
		}
		out = append(out, repo.Damage{Snapshot: k.sn, Disk: k.disk, Ranges: merged, Chunks: chunks[k]})
	}
	slices.SortFunc(out, func(a, b repo.Damage) int {
		if c := bytes.Compare(a.Snapshot[:], b.Snapshot[:]); c != 0 {
			return c
		}
		return cmpString(a.Disk, b.Disk)
	})
	return out
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// record writes what is still lost to the ledger, and that snapshots
// recorded before as damaged are whole again.
func record(ctx context.Context, r Repository, rep *Report) error {
	led, err := r.Ledger(ctx)
	if err != nil {
		return err
	}
	var events []repo.LedgerEvent
	damaged := map[repo.ID]bool{}
	for _, d := range rep.Damaged {
		sn := d.Snapshot
		damaged[sn] = true
		events = append(events, repo.LedgerEvent{Kind: repo.EventSnapshotDamaged, Snapshot: &sn, Disk: d.Disk, Ranges: d.Ranges})
	}
	for sn := range led.SnapshotDamage {
		if !damaged[sn] {
			id := sn
			events = append(events, repo.LedgerEvent{Kind: repo.EventSnapshotOK, Snapshot: &id})
			rep.Whole = append(rep.Whole, id)
		}
	}
	slices.SortFunc(rep.Whole, func(a, b repo.ID) int { return bytes.Compare(a[:], b[:]) })
	return r.SaveLedger(ctx, events)
}
