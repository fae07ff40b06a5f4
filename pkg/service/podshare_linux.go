package service

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// shareFSType is the filesystem the agent mounts a vm.Share with: QEMU
// exports shares over 9p (virtiofsd is not packaged for the Linux hosts).
const shareFSType = "9p"

// podShare is the pod VM's one share on a Linux host: a host directory
// exported under podShareTag for the VM's whole life. Containers come and
// go by host mounts below it: a container's rootfs is mounted at
// <dir>/<id>/rootfs and each bind source at <dir>/<id>/<n>, which QEMU
// serves as they appear (it exports the tree by path, multidevs=remap
// keeping inode numbers of the several filesystems apart). The VM's
// devices thus never depend on its containers.
type podShare struct {
	dir  string
	mnt  hostMounter
	stat func(string) (os.FileInfo, error)
}

func newPodShare(dir string, mnt hostMounter) *podShare {
	if mnt == nil {
		mnt = sysMounter{}
	}
	return &podShare{dir: dir, mnt: mnt, stat: os.Stat}
}

// vmShares creates the share's directory and describes it for vm.Config.
func (p *podShare) vmShares() ([]vm.Share, error) {
	if err := os.MkdirAll(p.dir, 0o711); err != nil {
		return nil, fmt.Errorf("pod share: %w", err)
	}
	return []vm.Share{{Tag: podShareTag, HostPath: p.dir}}, nil
}

// relocate serves the share from dir instead: a VM handed over by the
// pool daemon was started with a share directory of its own (QEMU opened
// it then), so containers are mounted below that one. Called after the
// boot, before any container is added; the unused default directory goes
// with the state directory.
func (p *podShare) relocate(dir string) {
	os.Remove(p.dir)
	p.dir = dir
}

func checkContainerID(id string) error {
	if id == "" || id == "." || id == ".." || filepath.Base(id) != id {
		return fmt.Errorf("container id %q cannot name a directory: %w", id, errdefs.ErrInvalidArgument)
	}
	return nil
}

// add mounts a container's rootfs and bind sources below the share and
// rewrites gs, the guest's copy of its spec, in place: every bind of a host file or directory
// becomes a bind of its guest path below guestPodShare, with the
// container's own flags (the host mount is read-only too when the bind
// is). Device nodes are left alone: the guest has its own /dev.
func (p *podShare) add(id string, root containerRootfs, gs *specs.Spec) (_ *containerFiles, retErr error) {
	if err := checkContainerID(id); err != nil {
		return nil, err
	}
	if _, err := p.vmShares(); err != nil {
		return nil, err
	}
	dir := filepath.Join(p.dir, id)
	// A directory left by an earlier failed create of the same ID goes.
	if err := p.remove(id); err != nil {
		return nil, err
	}
	if err := os.Mkdir(dir, 0o711); err != nil {
		return nil, fmt.Errorf("pod share for %s: %w", id, err)
	}
	defer func() {
		if retErr != nil {
			_ = p.remove(id)
		}
	}()
	rootfs := filepath.Join(dir, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return nil, err
	}
	files := &containerFiles{gspec: gs, hostDir: dir}
	if root.block {
		// Disks, mounted by the agent: the caller sets files.rootfs.
	} else if len(root.mounts) > 0 {
		if err := p.mnt.mountAll(root.mounts, rootfs); err != nil {
			return nil, fmt.Errorf("mount rootfs: %w", err)
		}
		files.rootfsMount = rootfs
	} else {
		if root.dir == "" {
			return nil, fmt.Errorf("container %s has neither rootfs mounts nor a root path: %w", id, errdefs.ErrInvalidArgument)
		}
		if _, err := p.mnt.bind(root.dir, rootfs, writable); err != nil {
			return nil, fmt.Errorf("bind rootfs %s: %w", root.dir, err)
		}
	}
	guestDir := path.Join(guestPodShare, id)
	files.rootfs = []*agent.Mount{{Type: "bind", Source: path.Join(guestDir, "rootfs"), Options: []string{"rbind"}}}

	n := 0
	for i := range gs.Mounts {
		m := &gs.Mounts[i]
		if !isBind(*m) {
			continue
		}
		src, fi, device, err := bindSource(*m, p.stat)
		if err != nil {
			return nil, err
		}
		if device {
			continue
		}
		name := strconv.Itoa(n)
		n++
		target := filepath.Join(dir, name)
		if fi.IsDir() {
			err = os.Mkdir(target, 0o755)
		} else {
			err = os.WriteFile(target, nil, 0o644)
		}
		if err != nil {
			return nil, err
		}
		ro := readOnlyOf(m.Options)
		submounts, err := p.mnt.bind(src, target, ro)
		if err != nil {
			return nil, fmt.Errorf("bind mount %s: %w", m.Destination, err)
		}
		m.Options = rroAsRO(m.Options)
		if ro == readOnlyTop && submounts {
			// A read-only bind is read-only at its top only: the mounts below
			// it stay writable (runc; critest's non-recursive readonly mount).
			// In the guest the whole tree is one 9p mount, which a read-only
			// bind would cover entirely, so the host's read-only mount of the
			// top enforces it instead (writes there fail with EROFS).
			m.Options = withoutReadOnly(m.Options)
		}
		m.Source = path.Join(guestDir, name)
	}
	return files, nil
}

// remove undoes a container's host mounts and removes its directory.
func (p *podShare) remove(id string) error {
	dir := filepath.Join(p.dir, id)
	if err := p.mnt.unmountAll(dir); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// removeAll undoes every host mount of the share and removes it.
func (p *podShare) removeAll() error {
	if err := p.mnt.unmountAll(p.dir); err != nil {
		return err
	}
	if err := os.RemoveAll(p.dir); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// sysMounter performs real mounts.
type sysMounter struct{}

func (sysMounter) mountAll(mounts []mount.Mount, target string) error {
	return mount.All(mounts, target)
}

func (sysMounter) bind(src, target string, ro readOnly) (bool, error) {
	if err := unix.Mount(src, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return false, err
	}
	below, err := mountinfo.GetMounts(mountinfo.PrefixFilter(target))
	if err != nil {
		_ = unix.Unmount(target, unix.MNT_DETACH)
		return false, fmt.Errorf("mounts below %s: %w", target, err)
	}
	submounts := false
	for _, m := range below {
		if filepath.Clean(m.Mountpoint) != filepath.Clean(target) {
			submounts = true
		}
	}
	switch ro {
	case readOnlyTop:
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return false, fmt.Errorf("remount read-only: %w", err)
		}
	case readOnlyAll:
		attr := &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}
		if err := unix.MountSetattr(-1, target, unix.AT_RECURSIVE, attr); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return false, fmt.Errorf("make read-only recursively: %w", err)
		}
	}
	return submounts, nil
}

func (sysMounter) unmountAll(dir string) error {
	if _, err := os.Lstat(dir); os.IsNotExist(err) {
		return nil
	}
	if err := mount.UnmountRecursive(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	left, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("%s: %d mounts left below it (first %s): %w", dir, len(left), left[0].Mountpoint, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// undoContainerMounts undoes one container's host mounts (its directory in
// the pod share), leaving the pod's.
func undoContainerMounts(st *bundleState) error {
	var m sysMounter
	for _, dir := range []string{st.Share, st.Rootfs} {
		if dir != "" {
			if err := m.unmountAll(dir); err != nil {
				return err
			}
		}
	}
	if st.Share != "" {
		return os.RemoveAll(st.Share)
	}
	return nil
}

// undoHostMounts is the delete action's cleanup after a dead shim: the
// container's mounts (and, with the VM gone, the whole pod share's).
func undoHostMounts(st *bundleState) error {
	if err := undoContainerMounts(st); err != nil {
		return err
	}
	var m sysMounter
	if st.VMPoolDir != "" {
		// A pooled VM's pod share is its own directory's (relocate); the
		// pool daemon removes the directory once nothing is mounted there.
		if err := m.unmountAll(st.VMPoolDir); err != nil {
			return err
		}
	}
	if st.VMStateDir != "" {
		return m.unmountAll(filepath.Join(st.VMStateDir, "shared"))
	}
	return nil
}
