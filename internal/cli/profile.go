package cli

import (
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
)

// profiles are the hidden profiling flags' files.
type profiles struct {
	cpu, mem, trace string
}

// startProfiles starts CPU profiling and an execution trace (which shows
// where the pipeline's goroutines wait: a core idle while a stage is
// serial) and arranges a heap profile; the returned function finishes
// them.
func startProfiles(p profiles) (func(), error) {
	var f, tf *os.File
	if p.cpu != "" {
		var err error
		if f, err = os.Create(p.cpu); err != nil {
			return nil, fmt.Errorf("cpu profile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			f.Close()
			return nil, fmt.Errorf("cpu profile: %w", err)
		}
	}
	if p.trace != "" {
		var err error
		if tf, err = os.Create(p.trace); err == nil {
			err = trace.Start(tf)
		}
		if err != nil {
			if tf != nil {
				tf.Close()
			}
			if f != nil {
				pprof.StopCPUProfile()
				f.Close()
			}
			return nil, fmt.Errorf("trace: %w", err)
		}
	}
	return func() {
		if f != nil {
			pprof.StopCPUProfile()
			f.Close()
		}
		if tf != nil {
			trace.Stop()
			tf.Close()
		}
		if p.mem != "" {
			if m, err := os.Create(p.mem); err == nil {
				runtime.GC()
				_ = pprof.Lookup("allocs").WriteTo(m, 0)
				m.Close()
			}
		}
	}, nil
}
