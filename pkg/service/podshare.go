package service

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

const (
	// podShareTag is the tag of the pod VM's one share.
	podShareTag = "shared"
	// guestPodShare is where the agent mounts the pod share in the guest:
	// a container's files are below guestPodShare/<container-id>/.
	guestPodShare = "/run/macvm/shared"
)

// containerFiles is how one container's files reach the VM: the spec the
// agent gets (bind sources and hooks rewritten) and its rootfs mounts.
type containerFiles struct {
	gspec  *specs.Spec
	rootfs []*agent.Mount
	// hostDir is the container's directory in the pod share on the host
	// (what `shim delete` unmounts after a crash), "" when there is none.
	hostDir string
	// rootfsMount is the host mount point of the snapshot, if the shim
	// mounted it.
	rootfsMount string
	// devices are the disks the agent mounts before rootfs (a block-image
	// root filesystem).
	devices []*agent.BlockDevice
}

// containerRootfs is where a container's root filesystem comes from: the
// snapshotter's mounts (the shim mounts them) or, without any, a host
// directory (the spec's root path).
type containerRootfs struct {
	mounts []mount.Mount
	dir    string
	// block: the mounts are disk images the agent mounts (rootfs_block.go);
	// nothing of the root goes through the share.
	block bool
}

// copySpec deep-copies spec for the guest, without the hooks (they ran, or
// will run, on the host).
func copySpec(spec *specs.Spec) (*specs.Spec, error) {
	data, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	var gs specs.Spec
	if err := json.Unmarshal(data, &gs); err != nil {
		return nil, err
	}
	gs.Hooks = nil
	dropNetworkNamespace(&gs)
	return &gs, nil
}

// isBind tells whether an OCI mount is a bind mount of a host path.
func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// readOnly is how much of a bind mount is read-only.
type readOnly int

const (
	writable readOnly = iota
	// readOnlyTop is "ro": the bind itself, not the mounts below it.
	readOnlyTop
	// readOnlyAll is "rro": the bind and every mount below it.
	readOnlyAll
)

// readOnlyOf classifies a bind mount's options.
func readOnlyOf(opts []string) readOnly {
	switch {
	case isRecursiveReadOnly(opts):
		return readOnlyAll
	case isReadOnly(opts):
		return readOnlyTop
	}
	return writable
}

// withoutReadOnly returns opts without "ro" (and "rw").
func withoutReadOnly(opts []string) []string {
	var out []string
	for _, o := range opts {
		if o != "ro" && o != "rw" {
			out = append(out, o)
		}
	}
	return out
}

// isRecursiveReadOnly tells whether opts ask for a recursive read-only
// mount ("rro", which containerd's CRI passes for a recursiveReadOnly
// volume since the shim announces the mount option: Manager.Info).
func isRecursiveReadOnly(opts []string) bool {
	return slices.Contains(opts, "rro")
}

// rroAsRO replaces "rro" with "ro" for the guest: a bind source crosses
// into the VM as part of one shared filesystem (9p, virtiofs), so a
// read-only bind of it there is read-only all the way down.
func rroAsRO(opts []string) []string {
	if !isRecursiveReadOnly(opts) {
		return opts
	}
	out := make([]string, 0, len(opts))
	for _, o := range opts {
		if o == "rro" {
			o = "ro"
		}
		out = append(out, o)
	}
	return out
}

func isReadOnly(opts []string) bool {
	ro := false
	for _, o := range opts {
		switch o {
		case "ro", "rro":
			ro = true
		case "rw":
			ro = false
		}
	}
	return ro
}

// bindSource checks a bind mount's host source; device nodes are reported
// so that the caller leaves them alone (the guest has its own /dev, and
// host devices cannot cross the share anyway).
func bindSource(m specs.Mount, stat func(string) (os.FileInfo, error)) (src string, fi os.FileInfo, device bool, err error) {
	if !filepath.IsAbs(m.Source) {
		return "", nil, false, fmt.Errorf("bind mount %s: source %q is not an absolute host path: %w", m.Destination, m.Source, errdefs.ErrInvalidArgument)
	}
	fi, err = stat(m.Source)
	if err != nil {
		return "", nil, false, fmt.Errorf("bind mount %s: %w", m.Destination, err)
	}
	return filepath.Clean(m.Source), fi, fi.Mode()&(os.ModeDevice|os.ModeCharDevice) != 0, nil
}

// hostMounter performs the pod share's host mounts; tests swap in a fake.
type hostMounter interface {
	// mountAll mounts a snapshot's mounts on target.
	mountAll(mounts []mount.Mount, target string) error
	// bind bind-mounts src (a directory or a file) on target, recursively,
	// and makes it read-only when asked: that mount only, not the ones
	// below it, as runc does for "ro", or all of them for "rro". It
	// reports whether the tree has mounts below its top.
	bind(src, target string, ro readOnly) (submounts bool, err error)
	// unmountAll detaches every mount at or below dir and fails if any is
	// left: a directory with mounts below it must never be removed
	// recursively (that would delete the user's files).
	unmountAll(dir string) error
}
