package mem_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/sauve-backup/sauve/internal/backend"
	"github.com/sauve-backup/sauve/internal/backend/backendtest"
	"github.com/sauve-backup/sauve/internal/backend/mem"
)

func TestConformance(t *testing.T) {
	backendtest.Run(t, mem.New(), backendtest.Options{LargeSize: 3<<20 + 1})
}

// The storage clock stamps each object as it is saved; Stat and List show
// that time, whatever the caller's clock says.
func TestStorageClock(t *testing.T) {
	ctx := context.Background()
	be := mem.New()
	at := time.Date(2031, 5, 4, 3, 2, 1, 0, time.UTC)
	be.SetClock(func() time.Time { return at })
	h := backend.Handle{Type: backend.SessionFile, Name: "a"}
	if err := be.Save(ctx, h, bytes.NewReader([]byte("x")), 1); err != nil {
		t.Fatal(err)
	}
	at = at.Add(time.Hour)
	fi, err := be.Stat(ctx, h)
	if err != nil || !fi.ModTime.Equal(at.Add(-time.Hour)) {
		t.Fatalf("Stat: %+v %v, want the time of Save", fi, err)
	}
	var listed []backend.Info
	be.List(ctx, backend.SessionFile, func(fi backend.Info) error { listed = append(listed, fi); return nil })
	if len(listed) != 1 || !listed[0].ModTime.Equal(fi.ModTime) {
		t.Fatalf("List: %+v, want %v", listed, fi.ModTime)
	}
}
