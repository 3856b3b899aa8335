package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sauve-backup/sauve/internal/shadow"
)

// mountStepName names the filesystems' step in the state file.
const mountStepName = "mounts"

// MountStep freezes filesystems (FIFREEZE) under the thaw guard of
// shadow.FreezeMounts: a process of its own that thaws them when asked,
// at the end of the window, and when the agent dies, even by kill -9.
type MountStep struct {
	Mounts []string
	// Guard is the thaw guard's command (nil: sauve's own executable).
	Guard []string
	// Warn hears what is worth saying that is not an error.
	Warn func(string)
}

// mountRecord is the step's record in the state file.
type mountRecord struct {
	Mounts []string `json:"mounts"`
}

func (m *MountStep) Name() string { return mountStepName }

func (m *MountStep) Record() (json.RawMessage, error) {
	return json.Marshal(mountRecord{Mounts: m.Mounts})
}

// Freeze freezes the mounts in order; the guard thaws them after window.
func (m *MountStep) Freeze(ctx context.Context, window time.Duration) (Frozen, error) {
	if len(m.Mounts) == 0 {
		return mountsFrozen{}, nil
	}
	z, err := shadow.FreezeMounts(ctx, m.Mounts, shadow.Options{FreezeTimeout: window, Guard: m.Guard, Warn: m.Warn})
	if err != nil {
		return nil, err
	}
	return mountsFrozen{z: z}, nil
}

// Recover thaws the recorded mounts.
func (m *MountStep) Recover(ctx context.Context, rec json.RawMessage) error {
	return recoverMounts(rec)
}

type mountsFrozen struct{ z *shadow.Frozen }

func (f mountsFrozen) Report() FreezeReport {
	if f.z == nil {
		return FreezeReport{}
	}
	return FreezeReport{Mounts: f.z.Mounts()}
}

func (f mountsFrozen) Thaw(ctx context.Context) error {
	if f.z == nil {
		return nil
	}
	_, err := f.z.Thaw()
	return err
}

// recoverMounts thaws the mounts of a record, last first. A mount that is
// not frozen, or not there any more, needs nothing.
func recoverMounts(rec json.RawMessage) error {
	var r mountRecord
	if err := json.Unmarshal(rec, &r); err != nil {
		return fmt.Errorf("the record of the mounts: %w", err)
	}
	var errs []error
	for i := len(r.Mounts) - 1; i >= 0; i-- {
		if err := thawMount(r.Mounts[i]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// thawMount thaws the filesystem mounted at path; one that is not there
// any more, or not frozen, needs nothing.
func thawMount(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("thaw %q: not an absolute path", path)
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return shadow.ThawMount(path)
}
