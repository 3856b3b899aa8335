package cli

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"
)

// meter draws one progress bar on stderr, fed by polling counters that the
// pipelines update atomically; the pipelines know nothing of terminals.
type meter struct {
	p    *mpb.Progress
	bar  *mpb.Bar
	stop chan struct{}
	done chan struct{}
}

type meterSource struct {
	label   string
	total   func() int64 // <0: unknown
	current func() int64
	extra   func() string
}

func startMeter(w io.Writer, enabled bool, src meterSource) *meter {
	if !enabled {
		return nil
	}
	m := &meter{stop: make(chan struct{}), done: make(chan struct{})}
	// Auto refresh even when w is not a terminal: enabled is already the
	// caller's decision (--progress always draws into logs too). There the
	// width is that of the whole line, not of the bar: leave room for the
	// rate and ETA.
	width := 40
	if f, ok := w.(*os.File); !ok || !term.IsTerminal(int(f.Fd())) {
		width = 150
	}
	m.p = mpb.New(mpb.WithOutput(w), mpb.WithWidth(width), mpb.WithRefreshRate(200*time.Millisecond), mpb.WithAutoRefresh())
	total := src.total()
	m.bar = m.p.New(max(total, 0), mpb.BarStyle().Lbound("[").Rbound("]"),
		mpb.PrependDecorators(
			decor.Name(src.label+" ", decor.WCSyncSpaceR),
			decor.Any(func(s decor.Statistics) string {
				if total < 0 {
					return fmt.Sprintf("%.1f GiB", float64(s.Current)/(1<<30))
				}
				return fmt.Sprintf("%.1f/%.1f GiB", float64(s.Current)/(1<<30), float64(s.Total)/(1<<30))
			}, decor.WCSyncSpace),
		),
		mpb.AppendDecorators(
			decor.EwmaSpeed(decor.SizeB1024(0), "% .1f", 30, decor.WCSyncSpace),
			decor.Any(func(decor.Statistics) string {
				if total < 0 {
					return ""
				}
				return "ETA"
			}, decor.WCSyncSpace),
			decor.EwmaETA(decor.ET_STYLE_GO, 30, decor.WCSyncSpace),
			decor.Any(func(decor.Statistics) string {
				if src.extra == nil {
					return ""
				}
				return src.extra()
			}, decor.WCSyncSpace),
		),
	)
	go func() {
		defer close(m.done)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		last := time.Now()
		for {
			select {
			case <-m.stop:
				return
			case now := <-t.C:
				if tt := src.total(); tt >= 0 && tt != total {
					total = tt
					m.bar.SetTotal(tt, false)
				}
				m.bar.EwmaSetCurrent(src.current(), now.Sub(last))
				last = now
			}
		}
	}()
	return m
}

// Stop removes the bar.
func (m *meter) Stop() {
	if m == nil {
		return
	}
	close(m.stop)
	<-m.done
	m.bar.Abort(true)
	m.p.Wait()
}
