package service

import (
	"path/filepath"
	"slices"

	"github.com/containerd/containerd/v2/core/mount"
)

// directRootfs returns the directory behind a root filesystem that is a
// single bind mount of a host directory (containerd's native snapshotter),
// which can be shared into the VM as it is, with no mount on the host.
// That is the only form of root filesystem the shim can use on macOS,
// where containerd's mount package mounts nothing.
func directRootfs(mounts []mount.Mount) (string, bool) {
	if len(mounts) != 1 {
		return "", false
	}
	m := mounts[0]
	if m.Type != "bind" && !slices.Contains(m.Options, "bind") && !slices.Contains(m.Options, "rbind") {
		return "", false
	}
	if !filepath.IsAbs(m.Source) {
		return "", false
	}
	return filepath.Clean(m.Source), true
}
