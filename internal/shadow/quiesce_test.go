package shadow

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sauve-backup/sauve/internal/source"
)

// recorder is a Quiescer that logs what happens to it.
type recorder struct {
	log      *[]string
	fail     error // Quiesce's
	thawFail error
	thawCtx  error // the thaw's context's error when it ran
}

func (r *recorder) Quiesce(ctx context.Context, at Instant) (func(context.Context) error, error) {
	*r.log = append(*r.log, "quiesce "+strings.Join(at.Disks, ",")+" "+at.Provider)
	return func(ctx context.Context) error {
		r.thawCtx = ctx.Err()
		*r.log = append(*r.log, "thaw")
		return r.thawFail
	}, r.fail
}

func TestQuiesceAroundTake(t *testing.T) {
	at := Instant{Disks: []string{"/dev/vda"}, Provider: "lvm"}
	for _, tc := range []struct {
		name               string
		fail, take, thawEr error
		cancel             bool
		want               []string
		wantErr            string
	}{
		{name: "ok", want: []string{"quiesce /dev/vda lvm", "take", "thaw"}},
		{name: "quiesce fails: no copy, thawed", fail: errors.New("pre-freeze hook failed"),
			want: []string{"quiesce /dev/vda lvm", "thaw"}, wantErr: "pre-freeze hook failed"},
		{name: "copy fails: thawed", take: errors.New("lvcreate failed"),
			want: []string{"quiesce /dev/vda lvm", "take", "thaw"}, wantErr: "lvcreate failed"},
		{name: "thaw fails: an error", thawEr: errors.New("post-thaw hook failed"),
			want: []string{"quiesce /dev/vda lvm", "take", "thaw"}, wantErr: "thaw the applications: post-thaw hook failed"},
		{name: "cancelled: thawed on a live context", cancel: true, take: context.Canceled,
			want: []string{"quiesce /dev/vda lvm", "take", "thaw"}, wantErr: "canceled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var log []string
			q := &recorder{log: &log, fail: tc.fail, thawFail: tc.thawEr}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			err := quiesce(ctx, q, at, func() error {
				log = append(log, "take")
				if tc.cancel {
					cancel()
				}
				return tc.take
			})
			if strings.Join(log, "; ") != strings.Join(tc.want, "; ") {
				t.Errorf("ran %q, want %q", log, tc.want)
			}
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("err %v, want %q", err, tc.wantErr)
			}
			if q.thawCtx != nil {
				t.Errorf("the thaw ran on a dead context: %v", q.thawCtx)
			}
		})
	}
}

// Quiescing needs an instant: a source read as it is has none, and the
// applications are not asked to hold still for a whole backup.
func TestQuiesceNeedsACopy(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	os.WriteFile(img, bytes.Repeat([]byte{7}, 1<<20), 0o644)
	var log []string
	p := New(Options{Mode: None, Quiesce: &recorder{log: &log}})
	_, err := p.Views(context.Background(), []*source.Source{open(t, img)})
	if err == nil || !strings.Contains(err.Error(), "no point-in-time copy") || !strings.Contains(err.Error(), img) {
		t.Fatalf("err %v, want a refusal naming %s", err, img)
	}
	if len(log) != 0 {
		t.Errorf("the applications were asked %q with no copy to take", log)
	}
}
