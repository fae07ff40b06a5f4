package service

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// shareFSType is the filesystem the agent mounts a vm.Share with:
// Virtualization.framework exports shares as virtiofs devices, the tag
// being the mount source.
const shareFSType = "virtiofs"

const (
	// rootfsTag is the share holding the container's root filesystem.
	rootfsTag = "rootfs"
	// guestShareRoot is where the agent mounts the bind-mount shares inside
	// the VM: share TAG appears at guestShareRoot/TAG.
	guestShareRoot = "/run/macvm/shares"
)

// podShare on macOS: the host has no bind mounts, so the Linux layout (one
// share, containers mounted below it) cannot be built. The VM gets the
// first container's directories as shares of their own instead (the
// rootfs, and one per bind-mounted directory), fixed when the VM is
// created: a pod VM on macOS holds one container. A
// VZMultipleDirectoryShare is the way to more.
type podShare struct {
	// mu guards shares and used.
	mu     sync.Mutex
	shares []vm.Share
	used   bool
}

func newPodShare(string, hostMounter) *podShare { return &podShare{} }

// relocate is never needed on macOS: there is no pool (QEMU only).
func (p *podShare) relocate(string) {}

func (p *podShare) vmShares() ([]vm.Share, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.shares), nil
}

func (p *podShare) add(id string, root containerRootfs, gs *specs.Spec) (*containerFiles, error) {
	dir := root.dir
	if len(root.mounts) > 0 && !root.block {
		var err error
		if dir, _, err = mountRootfs(root.mounts, ""); err != nil {
			return nil, err
		}
	}
	binds, err := rewriteBindMounts(gs, os.Stat)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.used {
		return nil, fmt.Errorf("container %s: more than one container per VM needs host bind mounts, which macOS lacks: %w", id, errdefs.ErrNotImplemented)
	}
	p.used = true
	p.shares = binds
	if !root.block {
		p.shares = append([]vm.Share{{Tag: rootfsTag, HostPath: dir}}, binds...)
	}
	return &containerFiles{
		gspec:  gs,
		rootfs: []*agent.Mount{{Type: shareFSType, Source: rootfsTag}},
	}, nil
}

func (p *podShare) remove(string) error { return nil }
func (p *podShare) removeAll() error    { return nil }

// rewriteBindMounts turns every bind mount of a host path in spec into a
// mount of the same data inside the VM and returns the shares that carry
// it:
//
//   - a host directory becomes a share of its own, and the OCI mount becomes
//     a virtiofs mount of that share (source = tag, the bind's flags kept,
//     "bind"/"rbind" dropped), which the agent performs like any other mount;
//   - a host file is reached through a share of its parent directory: the
//     mount stays a bind, its source rewritten to guestShareRoot/TAG/NAME,
//     where the agent mounts share TAG;
//   - character and block devices are left alone.
//
// Shares are deduplicated by host directory; a share is read-only only when
// every mount using it is, and each mount's own "ro" still applies in the
// guest.
func rewriteBindMounts(spec *specs.Spec, stat func(string) (os.FileInfo, error)) ([]vm.Share, error) {
	var shares []vm.Share
	byDir := map[string]int{}
	share := func(dir string, ro bool) string {
		if i, ok := byDir[dir]; ok {
			shares[i].ReadOnly = shares[i].ReadOnly && ro
			return shares[i].Tag
		}
		byDir[dir] = len(shares)
		tag := "b" + strconv.Itoa(len(shares))
		shares = append(shares, vm.Share{Tag: tag, HostPath: dir, ReadOnly: ro})
		return tag
	}
	for i := range spec.Mounts {
		m := &spec.Mounts[i]
		if !isBind(*m) {
			continue
		}
		src, fi, device, err := bindSource(*m, stat)
		if err != nil {
			return nil, err
		}
		ro := isReadOnly(m.Options)
		m.Options = rroAsRO(m.Options)
		switch {
		case device:
		case fi.IsDir():
			m.Source = share(src, ro)
			m.Type = shareFSType
			m.Options = slices.DeleteFunc(slices.Clone(m.Options), func(o string) bool { return o == "bind" || o == "rbind" })
		default:
			m.Source = path.Join(guestShareRoot, share(filepath.Dir(src), ro), filepath.Base(src))
		}
	}
	return shares, nil
}

// undoContainerMounts has nothing to do on macOS: the shim mounts nothing.
func undoContainerMounts(*bundleState) error { return nil }

// undoHostMounts has nothing to do on macOS: the shim mounts nothing.
func undoHostMounts(*bundleState) error { return nil }
