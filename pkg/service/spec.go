package service

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/macvm/macvm/pkg/vm"
)

const (
	// rootfsTag is the share holding the container's root filesystem (the
	// snapshot mounted on the host at BUNDLE/rootfs).
	rootfsTag = "rootfs"
	// guestShareRoot is where the agent mounts the bind-mount shares inside
	// the VM: share TAG appears at guestShareRoot/TAG, and the rewritten spec
	// names bind sources below it.
	guestShareRoot = "/run/macvm/shares"
)

// ninePOptions are the 9p mount options for every share: virtio transport,
// the Linux dialect (ownership, modes, xattrs) and a large msize, which is
// worth 10-30x in throughput here. cache=mmap keeps mmap() of shared files
// working without the coherence problems of a full cache.
var ninePOptions = []string{"trans=virtio", "version=9p2000.L", "msize=512000", "cache=mmap"}

// shareMount returns the options with which the agent mounts a share.
func shareMount(readOnly bool) []string {
	opts := slices.Clone(shareFSOptions)
	if readOnly {
		opts = append(opts, "ro")
	}
	return opts
}

// isBind tells whether an OCI mount is a bind mount of a host path.
func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

func isReadOnly(opts []string) bool {
	ro := false
	for _, o := range opts {
		switch o {
		case "ro":
			ro = true
		case "rw":
			ro = false
		}
	}
	return ro
}

// rewriteBindMounts turns every bind mount of a host path in spec into a
// mount of the same data inside the VM and returns the shares that carry
// it:
//
//   - a host directory becomes a share of its own, and the OCI mount becomes
//     a 9p (virtiofs on macOS) mount of that share (type shareFSType, source = tag, the bind's flags
//     kept, "bind"/"rbind" dropped), which the agent performs like any other
//     mount;
//   - a host file is reached through a share of its parent directory (9p
//     exports directories only): the mount stays a bind, its source
//     rewritten to guestShareRoot/TAG/NAME, where the agent mounts share TAG;
//   - character and block devices are left alone: the guest has its own
//     /dev, and host devices cannot cross 9p anyway.
//
// Shares are deduplicated by host directory; a share is read-only only when
// every mount using it is, and each mount's own "ro" still applies in the
// guest. stat is os.Stat outside tests.
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
		if !filepath.IsAbs(m.Source) {
			return nil, fmt.Errorf("bind mount %s: source %q is not an absolute host path: %w", m.Destination, m.Source, errdefs.ErrInvalidArgument)
		}
		fi, err := stat(m.Source)
		if err != nil {
			return nil, fmt.Errorf("bind mount %s: %w", m.Destination, err)
		}
		ro := isReadOnly(m.Options)
		switch {
		case fi.IsDir():
			m.Source = share(filepath.Clean(m.Source), ro)
			m.Type = shareFSType
			opts := slices.DeleteFunc(slices.Clone(m.Options), func(o string) bool { return o == "bind" || o == "rbind" })
			m.Options = append(opts, shareFSOptions...)
		case fi.Mode()&(os.ModeDevice|os.ModeCharDevice) != 0:
			// The guest's own device node of the same name.
		default:
			src := filepath.Clean(m.Source)
			m.Source = path.Join(guestShareRoot, share(filepath.Dir(src), ro), filepath.Base(src))
		}
	}
	return shares, nil
}
