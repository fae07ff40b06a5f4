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

// Refusal records (vz_refusals.go) hold for one macOS version and build:
// an update may change what the framework restores.
func init() {
	vzSystemVersion = func() string {
		v, _ := syscall.Sysctl("kern.osproductversion")
		b, _ := syscall.Sysctl("kern.osversion")
		return "macOS " + v + " (" + b + ")"
	}
}

func (v *vzVM) SaveSupported() error {
	if ok, err := v.config.ValidateSaveRestoreSupport(); !ok || err != nil {
		return vzSaveRestoreError(err)
	}
	return nil
}

func (v *vzVM) SaveState(path string) error {
	if err := v.SaveSupported(); err != nil {
		return err
	}
	return v.vm.SaveMachineStateToPath(path)
}

func (v *vzVM) RestoreState(path string) error {
	if err := v.SaveSupported(); err != nil {
		return err
	}
	return v.vm.RestoreMachineStateFromURL(path)
}
