package agent

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// stepLog records what steps do, in order.
type stepLog struct {
	mu  sync.Mutex
	log []string
}

func (l *stepLog) add(s string) {
	l.mu.Lock()
	l.log = append(l.log, s)
	l.mu.Unlock()
}

func (l *stepLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.log, " ")
}

type fakeStep struct {
	name      string
	hang      time.Duration // Freeze sleeps this long, ignoring ctx
	log       *stepLog
	fail      error
	thawErr   error
	state     string // the state file's path, checked while freezing
	sawState  bool
	recovered json.RawMessage
}

func (s *fakeStep) Name() string { return s.name }

func (s *fakeStep) Record() (json.RawMessage, error) {
	return json.Marshal(map[string]string{"what": s.name + "-data"})
}

func (s *fakeStep) Freeze(ctx context.Context, window time.Duration) (Frozen, error) {
	if s.state != "" {
		_, err := os.Stat(s.state)
		s.sawState = err == nil
	}
	if _, ok := ctx.Deadline(); !ok || window <= 0 {
		return nil, errors.New("no window")
	}
	if s.hang > 0 {
		time.Sleep(s.hang)
	}
	if s.fail != nil {
		s.log.add("fail:" + s.name)
		return nil, s.fail
	}
	s.log.add("freeze:" + s.name)
	return &fakeStepFrozen{s}, nil
}

func (s *fakeStep) Recover(ctx context.Context, rec json.RawMessage) error {
	s.log.add("recover:" + s.name)
	s.recovered = rec
	return nil
}

type fakeStepFrozen struct{ s *fakeStep }

func (z *fakeStepFrozen) Report() FreezeReport {
	if z.s.name == "mounts" {
		return FreezeReport{Mounts: []string{"/srv"}}
	}
	return FreezeReport{Writers: []WriterReport{{Name: z.s.name}}}
}

func (z *fakeStepFrozen) Thaw(ctx context.Context) error {
	z.s.log.add("thaw:" + z.s.name)
	return z.s.thawErr
}

// Steps freeze in order and thaw in reverse; the state file exists from
// before the first freeze until the thaw.
func TestChainOrder(t *testing.T) {
	state := filepath.Join(t.TempDir(), "run", "state.json")
	l := &stepLog{}
	pg, my, mnt := &fakeStep{name: "postgresql", log: l, state: state}, &fakeStep{name: "mysql", log: l}, &fakeStep{name: "mounts", log: l}
	c := &Chain{Steps: []Step{pg, my, mnt}, StateFile: state}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	z, err := c.Freeze(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !pg.sawState {
		t.Error("the state file was not written before the first step froze")
	}
	rep := z.Report()
	if len(rep.Writers) != 2 || rep.Writers[0].Name != "postgresql" || len(rep.Mounts) != 1 {
		t.Errorf("report %+v", rep)
	}
	st, err := readState(state)
	if err != nil || st == nil || len(st.Steps) != 3 || st.Steps[2].Name != "mounts" || st.PID != os.Getpid() {
		t.Fatalf("state while frozen: %+v %v", st, err)
	}
	if err := z.Thaw(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got, want := l.String(), "freeze:postgresql freeze:mysql freeze:mounts thaw:mounts thaw:mysql thaw:postgresql"; got != want {
		t.Errorf("order: %s\nwant  %s", got, want)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state file left after the thaw: %v", err)
	}
}

// A step that fails thaws those before it, and the error names it.
func TestChainFailure(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	l := &stepLog{}
	c := &Chain{Steps: []Step{&fakeStep{name: "a", log: l}, &fakeStep{name: "b", log: l, fail: errors.New("lock wait timeout")}, &fakeStep{name: "c", log: l}}, StateFile: state}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := c.Freeze(ctx, time.Second)
	if err == nil || !strings.Contains(err.Error(), "freeze b: lock wait timeout") {
		t.Fatalf("failed chain: %v", err)
	}
	if got, want := l.String(), "freeze:a fail:b thaw:a"; got != want {
		t.Errorf("order: %s, want %s", got, want)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state file left after a failed freeze: %v", err)
	}
}

// A run that died frozen left the state file: the next start undoes each
// step in reverse, with its record, and removes the file. A recorded step
// the new run does not have is reported, the file kept.
func TestChainRecover(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	l := &stepLog{}
	a, b := &fakeStep{name: "a", log: l}, &fakeStep{name: "b", log: l}
	c := &Chain{Steps: []Step{a, b}, StateFile: state}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := c.Freeze(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	// The agent dies here: no thaw.
	c2 := &Chain{Steps: []Step{&fakeStep{name: "a", log: l}, &fakeStep{name: "b", log: l}}, StateFile: state}
	done, err := c2.Recover(context.Background())
	if err != nil || strings.Join(done, ",") != "b,a" {
		t.Fatalf("recover: %v %v", done, err)
	}
	if got := string(c2.Steps[0].(*fakeStep).recovered); got != `{"what":"a-data"}` {
		t.Errorf("a recovered with %s", got)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state file left after recovery: %v", err)
	}
	if done, err := c2.Recover(context.Background()); err != nil || done != nil {
		t.Errorf("recover without a state file: %v %v", done, err)
	}

	if _, err := c.Freeze(ctx, time.Second); err != nil {
		t.Fatal(err)
	}
	c3 := &Chain{Steps: []Step{&fakeStep{name: "a", log: l}}, StateFile: state}
	done, err = c3.Recover(context.Background())
	if err == nil || !strings.Contains(err.Error(), `step "b" is not configured`) || strings.Join(done, ",") != "a" {
		t.Errorf("recover with a step missing: %v %v", done, err)
	}
	if _, err := os.Stat(state); err != nil {
		t.Errorf("the state file of an incomplete recovery is gone: %v", err)
	}
	// A corrupt state file is an error, not a panic nor silence.
	os.WriteFile(state, []byte(`{"sauve_agent_state":1,"steps":[{"name":`), 0o600)
	if _, err := c3.Recover(context.Background()); err == nil {
		t.Error("a corrupt state file recovered")
	}
}

// A recorded mounts step is undone even when this run freezes no mounts;
// a mount that is gone needs nothing.
func TestRecoverMountsGone(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	rec, _ := json.Marshal(mountRecord{Mounts: []string{filepath.Join(t.TempDir(), "gone")}})
	writeState(state, &stateFile{Version: stateVersion, Steps: []stateStep{{Name: mountStepName, Record: rec}}})
	done, err := (&Chain{StateFile: state}).Recover(context.Background())
	if err != nil || len(done) != 1 || done[0] != mountStepName {
		t.Fatalf("recover: %v %v", done, err)
	}
}

// The log never blocks the agent: a writer stuck (a log file on a
// frozen filesystem) costs dropped lines, counted when it flows again.
func TestLogWriterNeverBlocks(t *testing.T) {
	release := make(chan struct{})
	sink := &syncBuffer{}
	stuck := writerFunc(func(p []byte) (int, error) {
		<-release
		return sink.Write(p)
	})
	lw := NewLogWriter(stuck)
	log := NewLogger(lw)
	start := time.Now()
	for i := 0; i < logQueue+100; i++ {
		log.Info("freeze", "i", i)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("logging to a stuck writer took %v", d)
	}
	close(release)
	for len(lw.lines) > 0 {
		time.Sleep(5 * time.Millisecond)
	}
	log.Info("after")
	lw.Close(5 * time.Second)
	out := sink.String()
	if !strings.Contains(out, "log lines dropped") || !strings.Contains(out, `"msg":"after"`) {
		t.Errorf("log after the writer came back:\n%.500s", out[max(0, len(out)-500):])
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// A step that hangs past the window, ignoring ctx: the chain gives up at
// the window's end and thaws the steps before it; what the hung step
// froze is thawed when it returns.
func TestChainHungStep(t *testing.T) {
	l := &stepLog{}
	c := &Chain{Steps: []Step{&fakeStep{name: "a", log: l}, &fakeStep{name: "hung", log: l, hang: 500 * time.Millisecond}}}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Freeze(ctx, 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "freeze hung: did not finish within the window") {
		t.Fatalf("hung step: %v", err)
	}
	if d := time.Since(start); d > 400*time.Millisecond {
		t.Errorf("the chain waited %v for a step that hung, window 200ms", d)
	}
	if got := l.String(); got != "freeze:a thaw:a" {
		t.Errorf("at the window's end: %s", got)
	}
	time.Sleep(500 * time.Millisecond)
	if got, want := l.String(), "freeze:a thaw:a freeze:hung thaw:hung"; got != want {
		t.Errorf("after the hung step returned: %s, want %s", got, want)
	}
}
