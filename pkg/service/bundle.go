package service

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// bundleStateFile is the shim's record in the bundle directory. It is what
// the `delete` action (run by containerd after a shim died) needs to clean
// up: the hypervisor the dead shim left running and the init's exit.
const bundleStateFile = "macvm-state.json"

type bundleState struct {
	// VMPid is the hypervisor process; VMStateDir its sockets and console.
	VMPid      int    `json:"vm_pid,omitempty"`
	VMStateDir string `json:"vm_state_dir,omitempty"`
	// VMPoolDir is set when the VM came from the warm-start pool: its
	// hypervisor runs in that directory (its command line names it, not
	// VMStateDir) and is not the shim's child, so it does not die with
	// the shim; the delete action kills it like a cold VM's.
	VMPoolDir string `json:"vm_pool_dir,omitempty"`
	// Rootfs is the host mount point the shim mounted, if any.
	Rootfs string `json:"rootfs,omitempty"`
	// Share is the container's directory in the pod share on the host:
	// its rootfs and bind sources are mounted below it.
	Share string `json:"share,omitempty"`
	// Exit is set once the init process has exited.
	Exit *bundleExit `json:"exit,omitempty"`
}

type bundleExit struct {
	Pid      uint32    `json:"pid"`
	Status   uint32    `json:"status"`
	ExitedAt time.Time `json:"exited_at"`
}

func readBundleState(bundle string) (*bundleState, error) {
	data, err := os.ReadFile(filepath.Join(bundle, bundleStateFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return &bundleState{}, nil
		}
		return nil, err
	}
	var st bundleState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", bundleStateFile, err)
	}
	return &st, nil
}

// writeBundleState replaces the record atomically so that a crash never
// leaves a half-written file for the delete action.
func writeBundleState(bundle string, st *bundleState) error {
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := filepath.Join(bundle, bundleStateFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(bundle, bundleStateFile))
}

// killLeftoverVM kills the hypervisor a crashed shim left behind. The pid
// is only trusted if the process still names the VM's directory (its
// state directory, or a pooled VM's own) on its command line: after a
// reboot or pid reuse it may be anything.
func killLeftoverVM(st *bundleState) (bool, error) {
	dir := st.VMStateDir
	if st.VMPoolDir != "" {
		dir = st.VMPoolDir
	}
	if st.VMPid <= 0 || dir == "" {
		return false, nil
	}
	cmdline, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(st.VMPid), "cmdline"))
	if err != nil || !strings.Contains(string(cmdline), dir) {
		return false, nil
	}
	if err := syscall.Kill(st.VMPid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return false, fmt.Errorf("kill leftover VM %d: %w", st.VMPid, err)
	}
	// It is not our child, so it cannot be reaped here; wait for it to go.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(st.VMPid, 0); errors.Is(err, syscall.ESRCH) {
			break
		}
		if data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(st.VMPid), "stat")); err == nil {
			if f := strings.Fields(string(data)); len(f) > 2 && f[2] == "Z" {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true, nil
}
