// Package backuptest backs bytes up as a one-disk snapshot, for the tests
// of packages that read snapshots back (repo's disk reader, restore).
package backuptest

import (
	"bytes"
	"context"
	"testing"

	"github.com/sauve-backup/sauve/internal/backup"
	"github.com/sauve-backup/sauve/internal/extent"
	"github.com/sauve-backup/sauve/internal/repo"
	"github.com/sauve-backup/sauve/internal/repo/repotest"
)

// Disk backs data up as the disk /dev/vda of a new snapshot, reading
// what m says holds data (all of it when m is nil), and returns the disk
// as the repository stored it.
func Disk(t testing.TB, tr *repotest.Repo, data []byte, m extent.Map, opts backup.Options) *repo.Disk {
	t.Helper()
	ctx := context.Background()
	src := backup.Source{Name: "vda", Path: "/dev/vda", Kind: "file", Size: int64(len(data)), At: bytes.NewReader(data), Map: m}
	res, err := backup.Run(ctx, tr.Repository, src, opts)
	if err != nil {
		t.Fatal(err)
	}
	sn, err := tr.LoadSnapshot(ctx, res.Snapshot.ID)
	if err != nil {
		t.Fatal(err)
	}
	return &sn.Disks[0]
}

// InOrder backs data up with one worker, which stores the chunks in
// disk order: readers' runs are then as long as their caps let them be.
func InOrder(t testing.TB, tr *repotest.Repo, data []byte) *repo.Disk {
	t.Helper()
	return Disk(t, tr, data, nil, backup.Options{Workers: 1})
}
