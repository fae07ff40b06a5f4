package service

import (
	"fmt"

	"github.com/containerd/containerd/v2/core/mount"
)

// mountRootfs mounts the snapshotter's mounts at target on the host; the
// mounted directory is then shared into the VM.
func mountRootfs(mounts []mount.Mount, target string) (dir string, mounted bool, err error) {
	if err := mount.All(mounts, target); err != nil {
		return "", false, fmt.Errorf("mount rootfs: %w", err)
	}
	return target, true, nil
}
