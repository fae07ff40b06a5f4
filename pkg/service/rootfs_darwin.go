package service

import (
	"fmt"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
)

// mountRootfs cannot mount on macOS (containerd's mount package returns
// ErrNotImplemented there): a bind mount of a directory (the native
// snapshotter) is shared into the VM directly over virtiofs. containerd
// 2.4's darwin default, the erofs snapshotter, hands out erofs layer
// images and an ext4 upper image instead, which never reach this function:
// they become disks (rootfs_block.go).
func mountRootfs(mounts []mount.Mount, target string) (dir string, mounted bool, err error) {
	if dir, ok := directRootfs(mounts); ok {
		return dir, false, nil
	}
	types := make([]string, len(mounts))
	for i, m := range mounts {
		types[i] = m.Type
	}
	return "", false, fmt.Errorf("root filesystem mounts %v: on macOS only a bind mount of a directory (snapshotter \"native\") or erofs/ext4 images (snapshotter \"erofs\") work: %w",
		types, errdefs.ErrNotImplemented)
}
