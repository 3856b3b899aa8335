package repo_test

// Parity groups on the in-memory backend: any one lost or damaged pack
// of a group comes back byte for byte, two lost ones are named as lost,
// and prune drops parity that covers a deleted pack.

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

func parityRepo(t *testing.T, k int) (*repotest.Repo, repo.ID) {
	tr := newPruneRepo(t)
	if err := tr.SetParity(k); err != nil {
		t.Fatal(err)
	}
	id := backupChunks(t, tr.Repository, 0, 100)
	return tr, id
}

func packsOf(tr *repotest.Repo) map[string][]byte {
	out := map[string][]byte{}
	for _, name := range tr.Backend.Names(backend.PackFile) {
		data, _ := tr.Backend.Get(backend.Handle{Type: backend.PackFile, Name: name})
		out[name] = bytes.Clone(data)
	}
	return out
}

func TestParityRebuildsAnyOnePack(t *testing.T) {
	tr, snap := parityRepo(t, 4)
	packs := packsOf(tr)
	if n := len(tr.Backend.Names(backend.ParityFile)); n != (len(packs)+3)/4 {
		t.Fatalf("%d parity objects for %d packs in groups of 4", n, len(packs))
	}
	ctx := context.Background()
	for name, want := range packs {
		h := backend.Handle{Type: backend.PackFile, Name: name}
		tr.Backend.Remove(ctx, h)
		rep, err := tr.Reopen(t).RepairPacks(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := tr.Backend.Get(h)
		if len(rep.Rebuilt) != 1 || rep.Rebuilt[0].String() != name || !bytes.Equal(got, want) {
			t.Fatalf("lost pack %s: report %+v, rebuilt %d bytes equal: %v", name[:8], rep, len(got), bytes.Equal(got, want))
		}
	}
	mustHold(t, tr, snap, 0, 100)

	// Damaged in place: check --read-data records it, repair rebuilds it
	// and records it sound.
	var victim string
	for name := range packs {
		victim = name
		break
	}
	tr.Backend.Damage(backend.Handle{Type: backend.PackFile, Name: victim}, 500)
	if rep, err := tr.Reopen(t).Check(ctx, repo.CheckOptions{ReadData: true, Record: true}); err != nil || rep.OK() {
		t.Fatalf("check --read-data over a damaged pack: ok=%v err=%v", rep.OK(), err)
	}
	rep, err := tr.Reopen(t).RepairPacks(ctx, false)
	if err != nil || len(rep.Rebuilt) != 1 || rep.Rebuilt[0].String() != victim {
		t.Fatalf("repair of a damaged pack: %+v %v", rep, err)
	}
	mustCheck(t, tr)
	mustHold(t, tr, snap, 0, 100)
}

func TestParityTwoLostInOneGroup(t *testing.T) {
	tr, _ := parityRepo(t, 4)
	groups, bad, err := tr.ParityGroups(context.Background())
	if err != nil || len(bad) != 0 || len(groups) == 0 || len(groups[0].Packs) < 2 {
		t.Fatalf("groups %v bad %v err %v", groups, bad, err)
	}
	for _, id := range groups[0].Packs[:2] {
		tr.Backend.Remove(context.Background(), backend.Handle{Type: backend.PackFile, Name: id.String()})
	}
	before := len(tr.Backend.Names(backend.PackFile))
	rep, err := tr.Reopen(t).RepairPacks(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rebuilt) != 0 || len(rep.Unrecoverable) != 2 || len(tr.Backend.Names(backend.PackFile)) != before {
		t.Fatalf("two lost packs of one group: %+v", rep)
	}
	for _, why := range rep.Unrecoverable {
		if !strings.Contains(why, "not two") {
			t.Fatalf("unclear reason: %s", why)
		}
	}
}

func TestPruneDropsParityOfDeletedPacks(t *testing.T) {
	tr := newPruneRepo(t)
	tr.SetParity(2)
	a := backupChunks(t, tr.Repository, 0, 40)
	b := backupChunks(t, tr.Repository, 100, 140)
	forget(t, tr, a)
	rep := prune(t, tr.Reopen(t), repo.PruneOptions{Parity: 2})
	if rep.Deleted.Packs == 0 || rep.ParityRemoved == 0 {
		t.Fatalf("prune: %+v", rep)
	}
	groups, bad, err := tr.ParityGroups(context.Background())
	if err != nil || len(bad) != 0 {
		t.Fatal(err, bad)
	}
	stored := map[string]bool{}
	for _, n := range tr.Backend.Names(backend.PackFile) {
		stored[n] = true
	}
	for _, g := range groups {
		for _, id := range g.Packs {
			if !stored[id.String()] {
				t.Fatalf("parity %s still covers deleted pack %s", g.Name[:8], id.Short())
			}
		}
	}
	mustHold(t, tr, b, 100, 140)
}

// Packs written without parity get it afterwards, and a lost one then
// comes back; a second run finds nothing to do.
func TestProtectPacks(t *testing.T) {
	tr := newPruneRepo(t)
	snap := backupChunks(t, tr.Repository, 0, 100)
	packs := packsOf(tr)
	ctx := context.Background()
	dry, err := tr.Reopen(t).ProtectPacks(ctx, 3, true, nil)
	if err != nil || dry.Protected != len(packs) || len(tr.Backend.Names(backend.ParityFile)) != 0 {
		t.Fatalf("dry run: %+v %v", dry, err)
	}
	rep, err := tr.Reopen(t).ProtectPacks(ctx, 3, false, nil)
	if err != nil || rep.Protected != len(packs) || rep.Groups != (len(packs)+2)/3 || rep.ParityBytes != dry.ParityBytes {
		t.Fatalf("protect: %+v %v", rep, err)
	}
	again, err := tr.Reopen(t).ProtectPacks(ctx, 3, false, nil)
	if err != nil || again.Protected != 0 || again.Covered != len(packs) {
		t.Fatalf("second run: %+v %v", again, err)
	}
	for name, want := range packs {
		h := backend.Handle{Type: backend.PackFile, Name: name}
		tr.Backend.Remove(ctx, h)
		if _, err := tr.Reopen(t).RepairPacks(ctx, false); err != nil {
			t.Fatal(err)
		}
		if got, _ := tr.Backend.Get(h); !bytes.Equal(got, want) {
			t.Fatalf("pack %s not rebuilt", name[:8])
		}
	}
	mustHold(t, tr, snap, 0, 100)
}

// A parity object forged or damaged (a holder of a write-only key can
// store one under any name) never plants a pack: the rebuilt bytes must
// hash to the lost pack's name, and nothing is stored otherwise.
func TestParityForgedOrDamagedPlantsNothing(t *testing.T) {
	tr, _ := parityRepo(t, 4)
	ctx := context.Background()
	groups, _, err := tr.ParityGroups(ctx)
	if err != nil || len(groups) == 0 {
		t.Fatal(groups, err)
	}
	g := groups[0]
	lost := g.Packs[0]
	tr.Backend.Remove(ctx, backend.Handle{Type: backend.PackFile, Name: lost.String()})
	tr.Backend.Damage(backend.Handle{Type: backend.ParityFile, Name: g.Name}, g.Length/2+1000)
	rep, err := tr.Reopen(t).RepairPacks(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	why := rep.Unrecoverable[lost.String()]
	if len(rep.Rebuilt) != 0 || !strings.Contains(why, "parity object is damaged") {
		t.Fatalf("repair from a damaged parity object: %+v", rep)
	}
	if _, ok := tr.Backend.Get(backend.Handle{Type: backend.PackFile, Name: lost.String()}); ok {
		t.Fatal("a pack was stored from damaged parity")
	}
}
