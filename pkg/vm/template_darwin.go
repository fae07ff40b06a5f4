package vm

import (
	"context"
	"errors"
	"fmt"

	vz "github.com/Code-Hex/vz/v3"
	"github.com/containerd/errdefs"
)

// Build makes cfg's template (see TemplateCache) with
// Virtualization.framework's save/restore (macOS 14+, arm64).
func (tc *TemplateCache) Build(ctx context.Context, cfg Config) error {
	if !vzSaveRestoreAvailable() {
		return fmt.Errorf("VM templates need macOS 14 on Apple silicon: %w", errdefs.ErrNotImplemented)
	}
	return tc.buildVZ(ctx, cfg, createVZ)
}

// vzSaveRestoreError explains a configuration the framework cannot save.
func vzSaveRestoreError(err error) error {
	if err == nil {
		err = errors.New("configuration cannot be saved")
	}
	if errors.Is(err, vz.ErrUnsupportedOSVersion) {
		return fmt.Errorf("save/restore: %w: %w", errdefs.ErrNotImplemented, err)
	}
	return fmt.Errorf("save/restore: %w: %w", errdefs.ErrFailedPrecondition, err)
}
