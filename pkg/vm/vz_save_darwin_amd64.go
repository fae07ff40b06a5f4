package vm

import (
	"fmt"

	"github.com/containerd/errdefs"
)

// Virtualization.framework saves and restores VMs only on Apple silicon.
func vzSaveRestoreAvailable() bool { return false }

func (v *vzVM) SaveSupported() error {
	return fmt.Errorf("saving a VM on Intel Macs: %w", errdefs.ErrNotImplemented)
}

func (v *vzVM) SaveState(string) error {
	return fmt.Errorf("saving a VM on Intel Macs: %w", errdefs.ErrNotImplemented)
}

func (v *vzVM) RestoreState(string) error {
	return fmt.Errorf("restoring a VM on Intel Macs: %w", errdefs.ErrNotImplemented)
}
