package vm

import (
	"strconv"
	"strings"
	"syscall"
)

// vzSaveRestoreAvailable reports whether Virtualization.framework can save
// and restore VMs here: macOS 14 or newer (arm64 only). Checked before
// any template work, so an older system never boots a VM for a template
// it cannot save.
func vzSaveRestoreAvailable() bool {
	v, err := syscall.Sysctl("kern.osproductversion")
	if err != nil {
		return false
	}
	major, _, _ := strings.Cut(v, ".")
	n, err := strconv.Atoi(major)
	return err == nil && n >= 14
}

func (v *vzVM) SaveState(path string) error {
	if ok, err := v.config.ValidateSaveRestoreSupport(); !ok || err != nil {
		return vzSaveRestoreError(err)
	}
	return v.vm.SaveMachineStateToPath(path)
}

func (v *vzVM) RestoreState(path string) error {
	if ok, err := v.config.ValidateSaveRestoreSupport(); !ok || err != nil {
		return vzSaveRestoreError(err)
	}
	return v.vm.RestoreMachineStateFromURL(path)
}
