package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// The state file records a freeze from before its first step until its
// thaw, so that an agent that died frozen (kill -9 of its whole cgroup,
// thaw guard included; a crash) is undone by the next start:
//
//	{"sauve_agent_state":1,"pid":1234,"started":"...","until":"...",
//	 "steps":[{"name":"mounts","record":{"mounts":["/srv/db"]}}]}
const stateVersion = 1

// maxStateFile bounds the state file read at start.
const maxStateFile = 1 << 20

type stateFile struct {
	Version int         `json:"sauve_agent_state"`
	PID     int         `json:"pid"`
	Started time.Time   `json:"started"`
	Until   time.Time   `json:"until"`
	Steps   []stateStep `json:"steps"`
}

type stateStep struct {
	Name   string          `json:"name"`
	Record json.RawMessage `json:"record"`
}

// writeState replaces the state file atomically and durably: it must be
// there before anything freezes.
func writeState(path string, st *stateFile) error {
	st.PID = os.Getpid()
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("record the freeze: %w", err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("record the freeze: %w", err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("record the freeze: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(append(data, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("record the freeze in %s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// readState reads the state file; nil when there is none.
func readState(path string) (*stateFile, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the freeze state: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxStateFile+1))
	if err != nil {
		return nil, fmt.Errorf("read the freeze state %s: %w", path, err)
	}
	if len(data) > maxStateFile {
		return nil, fmt.Errorf("freeze state %s: larger than %d bytes", path, maxStateFile)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("freeze state %s: %w", path, err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("freeze state %s: version %d, not %d", path, st.Version, stateVersion)
	}
	return &st, nil
}

func removeState(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove the freeze state: %w", err)
	}
	return nil
}
