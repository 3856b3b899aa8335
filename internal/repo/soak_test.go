package repo_test

import (
	"bytes"
	"context"
	"encoding/json"
	mrand "math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/crypto"
	"github.com/sauve-backup/sauve/internal/repo"
)

// TestDamageSoak plays rounds of backups by the owner and two writers
// (one hostile) while storage loses, truncates and corrupts packs and
// index objects at random. After every round: each backup's snapshot (but
// the hostile writer's) restores byte for byte, check says the same twice, and every snapshot
// check calls whole restores byte for byte. SAUVE_SOAK=1 runs 300 rounds
// instead of 12 (about 5 minutes).
func TestDamageSoak(t *testing.T) {
	rounds := 12
	if os.Getenv("SAUVE_SOAK") != "" {
		rounds = 300
	}
	w := newWorld(t)
	rng := mrand.New(mrand.NewPCG(7, 9))
	want := map[repo.ID][]byte{}
	base := [][]byte{disk(100, 24), disk(101, 24)}
	keys := []*crypto.Keys{w.owner, w.web1, w.evil}
	hosts := []string{"files", "web1", "evil"}
	for round := 0; round < rounds; round++ {
		// A disk: one of two bases with a few chunks changed.
		d := bytes.Clone(base[rng.IntN(2)])
		for range rng.IntN(4) {
			off := rng.IntN(24) * chunk
			copy(d[off:off+chunk], disk(rng.Uint64(), 1))
		}
		k := rng.IntN(3)
		sn, _ := w.backup(keys[k], hosts[k], d)
		if k < 2 {
			// The hostile writer's own snapshots may reuse its own
			// forgeries: that it may spoil; nothing else.
			w.mustRestore(sn.ID, d, "a fresh backup")
			want[sn.ID] = d
		}
		if k == 2 {
			// The hostile writer also shadows chunks of others.
			er := w.open(w.evil)
			w.forge(w.evil, repo.DataBlob, chunkIDs(er, base[rng.IntN(2)])[:rng.IntN(6)+1])
		}
		w.damage(rng)
		// Structure alone cannot tell the hostile writer's garbage from
		// data: what is whole is what check --read-data calls whole.
		// The first check records its findings; the next two must agree.
		w.check(true)
		a, b := w.check(true), w.check(true)
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		if !bytes.Equal(ja, jb) {
			t.Fatalf("round %d: check differs between runs", round)
		}
		// Every snapshot check calls whole restores: a sample each round
		// (the repository grows), all of them at the end.
		w.restoreWhole(t, round, a, want, 6, rng)
	}
	w.restoreWhole(t, rounds, w.check(true), want, len(want), rng)
}

// restoreWhole restores up to n snapshots that rep calls whole, at random,
// and compares them with what was backed up.
func (w *world) restoreWhole(t *testing.T, round int, rep *repo.CheckReport, want map[repo.ID][]byte, n int, rng *mrand.Rand) {
	damaged := map[repo.ID]bool{}
	for _, dm := range rep.Damaged {
		damaged[dm.Snapshot] = true
	}
	var whole []repo.ID
	for id := range want {
		if !damaged[id] {
			whole = append(whole, id)
		}
	}
	slices.SortFunc(whole, func(a, b repo.ID) int { return bytes.Compare(a[:], b[:]) })
	rng.Shuffle(len(whole), func(i, j int) { whole[i], whole[j] = whole[j], whole[i] })
	for _, id := range whole[:min(n, len(whole))] {
		got, err := w.restore(id)
		if err != nil || !bytes.Equal(got, want[id]) {
			t.Fatalf("round %d: snapshot %s is whole by check but restores %v (equal %v)", round, id.Short(), err, bytes.Equal(got, want[id]))
		}
	}
}

// damage does one random harm to storage: delete, truncate or flip a byte
// of a pack or an index object, or nothing. A flip in place is followed
// by the owner's check --read-data, which records it: a backup cannot
// tell such a pack from a sound one before that (FORMAT.md, "Residual
// risk").
func (w *world) damage(rng *mrand.Rand) {
	types := []backend.FileType{backend.PackFile, backend.IndexFile}
	ft := types[rng.IntN(2)]
	names := w.be.Names(ft)
	if len(names) == 0 {
		return
	}
	h := backend.Handle{Type: ft, Name: names[rng.IntN(len(names))]}
	data, _ := w.be.Get(h)
	switch rng.IntN(4) {
	case 0:
		w.be.Remove(context.Background(), h)
	case 1:
		w.be.Truncate(h, int64(rng.IntN(len(data))))
	case 2:
		w.be.Damage(h, int64(rng.IntN(len(data))))
		w.check(true)
	}
}
