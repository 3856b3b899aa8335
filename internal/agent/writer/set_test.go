package writer

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// logHooks is a Hooks labelled name that logs "freeze-NAME" and
// "thaw-NAME" to log, and whose pre-freeze runs fail after that when fail
// is not "".
func logHooks(log logFile, name, fail string) *Hooks {
	h := &Hooks{
		Label:     name,
		PreFreeze: []string{`echo freeze-` + name + ` >> "$LOG"`},
		PostThaw:  []string{`echo thaw-` + name + ` >> "$LOG"`},
		Env:       []string{log.env()},
	}
	if fail != "" {
		h.PreFreeze = append(h.PreFreeze, fail)
	}
	return h
}

func TestSetAbortThawsStartedInReverse(t *testing.T) {
	log := newLog(t)
	s := &Set{Writers: []Writer{
		logHooks(log, "A", ""),
		logHooks(log, "B", ""),
		logHooks(log, "C", `echo C-is-broken; exit 3`),
		logHooks(log, "D", ""),
	}}
	held, err := s.Freeze(t.Context())
	if err == nil {
		t.Fatal("Freeze succeeded")
	}
	if held != nil {
		t.Error("Freeze returned a Held with its error")
	}
	want := "freeze hooks (C): pre-freeze hook `echo C-is-broken; exit 3` failed (exit 3): C-is-broken"
	if err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	log.want(t, "freeze-A", "freeze-B", "freeze-C", "thaw-C", "thaw-B", "thaw-A")
}

func TestSetDegrade(t *testing.T) {
	log := newLog(t)
	s := &Set{Policy: Degrade, Writers: []Writer{
		logHooks(log, "A", ""),
		logHooks(log, "B", `echo B-is-broken; exit 3`),
		logHooks(log, "C", ""),
	}}
	held, err := s.Freeze(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	log.want(t, "freeze-A", "freeze-B", "thaw-B", "freeze-C")
	r := held.Report()
	if r.Consistency != Crash || !strings.Contains(r.Reason, "hooks (B)") || !strings.Contains(r.Reason, "B-is-broken") {
		t.Errorf("report says %q because %q", r.Consistency, r.Reason)
	}
	if len(r.Writers) != 3 {
		t.Fatalf("report has %d writers", len(r.Writers))
	}
	for i, w := range []struct {
		name   string
		frozen bool
	}{{"hooks (A)", true}, {"hooks (B)", false}, {"hooks (C)", true}} {
		got := r.Writers[i]
		if got.Name != w.name || got.Frozen != w.frozen || (got.Error != "") == w.frozen || got.Seconds <= 0 {
			t.Errorf("writer %d: %+v", i, got)
		}
	}
	if err := held.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	log.want(t, "freeze-A", "freeze-B", "thaw-B", "freeze-C", "thaw-C", "thaw-A")
	if r := held.Report(); r.WindowSeconds <= 0 {
		t.Errorf("window %v after thaw", r.WindowSeconds)
	}
	if err := held.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	log.want(t, "freeze-A", "freeze-B", "thaw-B", "freeze-C", "thaw-C", "thaw-A")
}

func TestSetApplicationConsistent(t *testing.T) {
	log := newLog(t)
	s := &Set{Writers: []Writer{logHooks(log, "A", ""), logHooks(log, "B", "")}}
	held, err := s.Freeze(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if err := held.Thaw(t.Context()); err != nil {
		t.Fatal(err)
	}
	r := held.Report()
	if r.Consistency != Application || r.Reason != "" || len(r.Writers) != 2 || !r.Writers[0].Frozen || !r.Writers[1].Frozen {
		t.Errorf("report %+v", r)
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(b), `{"consistency":"application","writers":[{"name":"hooks (A)","frozen":true,"seconds":`) {
		t.Errorf("JSON %s", b)
	}
	empty, err := (&Set{}).Freeze(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if r := empty.Report(); r.Consistency != Crash || r.Reason != "no writer" {
		t.Errorf("report of no writer: %+v", r)
	}
}

// TestSetThawAll: every writer is thawed, in reverse, even when one fails,
// and on the backup's context after Ctrl-C cancelled it.
func TestSetThawAll(t *testing.T) {
	log := newLog(t)
	a := logHooks(log, "A", "")
	a.PostThaw = append(a.PostThaw, `echo A-thaw-broken; exit 5`)
	b := logHooks(log, "B", "")
	b.PostThaw = append([]string{`exit 6`}, b.PostThaw...)
	ctx, cancel := context.WithCancel(t.Context())
	held, err := (&Set{Writers: []Writer{a, b, logHooks(log, "C", "")}}).Freeze(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	err = held.Thaw(ctx)
	log.want(t, "freeze-A", "freeze-B", "freeze-C", "thaw-C", "thaw-B", "thaw-A")
	if err == nil {
		t.Fatal("Thaw succeeded")
	}
	for _, want := range []string{"thaw hooks (A): post-thaw hook `echo A-thaw-broken; exit 5` failed (exit 5): A-thaw-broken", "thaw hooks (B): post-thaw hook `exit 6` failed (exit 6)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	r := held.Report()
	if r.Writers[0].ThawError == "" || r.Writers[1].ThawError == "" || r.Writers[2].ThawError != "" {
		t.Errorf("thaw errors in the report: %+v", r.Writers)
	}
	// A post-thaw failure does not undo the freeze: still consistent.
	if r.Consistency != Application {
		t.Errorf("consistency %q after a failed post-thaw", r.Consistency)
	}
	if err2 := held.Thaw(t.Context()); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("second Thaw said %v", err2)
	}
	log.want(t, "freeze-A", "freeze-B", "freeze-C", "thaw-C", "thaw-B", "thaw-A")
}

func TestSetDeadlineAndCancel(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy Policy
		cancel bool // cancel the context instead of the deadline passing
		is     error
	}{
		{"deadline abort", Abort, false, context.DeadlineExceeded},
		{"cancel abort", Abort, true, context.Canceled},
		// Ctrl-C means no snapshot, whatever the policy.
		{"cancel degrade", Degrade, true, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := newLog(t)
			s := &Set{
				Policy:   tc.policy,
				Deadline: 300 * time.Millisecond,
				Writers:  []Writer{logHooks(log, "A", ""), logHooks(log, "B", "sleep 30"), logHooks(log, "C", "")},
			}
			ctx := t.Context()
			if tc.cancel {
				s.Deadline = 0
				var cancel context.CancelFunc
				ctx, cancel = context.WithCancel(ctx)
				go func() { time.Sleep(300 * time.Millisecond); cancel() }()
			}
			t0 := time.Now()
			held, err := s.Freeze(ctx)
			if held != nil || err == nil {
				t.Fatalf("Freeze returned %v, %v", held, err)
			}
			t.Logf("%v (%.2f s)", err, time.Since(t0).Seconds())
			if !errors.Is(err, tc.is) || !strings.HasPrefix(err.Error(), "freeze hooks (B): pre-freeze hook `sleep 30`") {
				t.Errorf("error %q is not %v from B", err, tc.is)
			}
			if took := time.Since(t0); took > 3*time.Second {
				t.Errorf("Freeze took %s", took)
			}
			log.want(t, "freeze-A", "freeze-B", "thaw-B", "thaw-A")
		})
	}
}

func TestParsePolicy(t *testing.T) {
	for in, want := range map[string]Policy{"abort": Abort, "continue": Degrade, "Degrade": Degrade, " abort ": Abort} {
		if got, err := ParsePolicy(in); err != nil || got != want {
			t.Errorf("ParsePolicy(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParsePolicy("ignore"); err == nil {
		t.Error(`ParsePolicy("ignore") succeeded`)
	}
	if Abort.String() != "abort" || Degrade.String() != "degrade" || Policy(0) != Abort {
		t.Error("policy names")
	}
}
