package container

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// DiskRoot is the only place the agent mounts disks for containers: the
// host names each disk's mount point below it (pkg/service's
// guestDiskRoot), so a request cannot mount over the guest's own files.
const DiskRoot = "/run/macvm/disks"

// BlockDevice is a disk holding part of a container's root filesystem (an
// erofs layer, the ext4 writable layer), mounted before the rootfs mounts.
type BlockDevice struct {
	// Serial is the disk's virtio-blk serial; Index its position among the
	// VM's disks, used when the device reports no serial.
	Serial string
	Index  int
	FSType string
	// Options are mount options (flags like "ro", and filesystem data).
	Options []string
	// Path is the mount point, below DiskRoot.
	Path string
	// Mkdirs are "REL[:MODE[:UID:GID]]" directories made in the mounted
	// filesystem (the overlay's upper and work directories).
	Mkdirs []string
}

// sysBlock is where the kernel lists block devices (a variable for tests).
var sysBlock = "/sys/block"

// findDisk returns the /dev node of the virtio disk with serial (or, when
// virtio disks report no serial at all, the one at index), waiting until
// ctx ends for the device to appear: virtio_blk may still be probing when
// the first container is created.
func findDisk(ctx context.Context, serial string, index int) (string, error) {
	for {
		dev, err := lookupDisk(serial, index)
		if err == nil {
			return dev, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("disk %q (index %d): %w (waited: %v)", serial, index, err, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// lookupDisk is one look at sysBlock for findDisk.
func lookupDisk(serial string, index int) (string, error) {
	entries, err := os.ReadDir(sysBlock)
	if err != nil {
		return "", err
	}
	var vds []string
	anySerial := false
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, "vd") {
			continue
		}
		vds = append(vds, name)
		b, err := os.ReadFile(filepath.Join(sysBlock, name, "serial"))
		s := strings.TrimSpace(string(b))
		if err != nil || s == "" {
			continue
		}
		anySerial = true
		if serial != "" && s == serial {
			again, err := reprobe(name)
			if err != nil {
				return "", fmt.Errorf("disk %q (%s): %w", serial, name, err)
			}
			if again {
				// The device is back, maybe under another name.
				return "", fmt.Errorf("disk %q (%s) re-probed: %w", serial, name, errdefs.ErrNotFound)
			}
			return "/dev/" + name, nil
		}
	}
	if !anySerial && index >= 0 {
		// No serials at all (a hypervisor that sets none): vda, vdb, ...
		// follow the configuration order. vdaa comes after vdz.
		sortDisks(vds)
		if index < len(vds) {
			return "/dev/" + vds[index], nil
		}
	}
	return "", fmt.Errorf("no virtio disk with serial %q among %v: %w", serial, vds, errdefs.ErrNotFound)
}

// reprobed are the virtio devices whose disk was re-probed (see reprobe),
// so that a disk that really is empty is re-probed once only.
var (
	reprobeMu sync.Mutex // guards reprobed
	reprobed  = map[string]bool{}
)

// standInSectors is the largest capacity, in 512-byte sectors, at which
// a disk may be a warm-start template's stand-in: QEMU's are empty files,
// Virtualization.framework's are vm.StandInDiskBytes (4 KiB), since
// whether the framework takes an empty image is unknown. No container
// image is that small (ext4 and erofs superblocks end past 1 KiB, and
// mkfs.erofs writes 4 KiB blocks); re-probing one that is would only cost
// an unbind and a bind, once.
const standInSectors = 8

// reprobe makes virtio_blk probe the disk name again if the guest sees it
// with a stand-in's capacity (standInSectors or less), and reports whether
// it did. In a VM cloned from a warm-start template the guest probed, at
// the template's boot, a stand-in image; the clone's hypervisor has the
// container's image there, but virtio_blk reads a disk's capacity when it
// probes it (or on a config-change interrupt, which QEMU raises only for a
// resize, and a read-only disk cannot be resized). Unbinding and binding
// the virtio device re-reads the capacity and the partitions, with
// nothing cached from the stand-in (the old disk and its page cache go
// with the unbind).
func reprobe(name string) (bool, error) {
	b, err := os.ReadFile(filepath.Join(sysBlock, name, "size"))
	if err != nil {
		return false, nil
	}
	sectors, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || sectors > standInSectors {
		return false, nil
	}
	devLink := filepath.Join(sysBlock, name, "device")
	dev, err := filepath.EvalSymlinks(devLink)
	if err != nil {
		return false, fmt.Errorf("virtio device of %s: %w", name, err)
	}
	drv, err := filepath.EvalSymlinks(filepath.Join(devLink, "driver"))
	if err != nil {
		return false, fmt.Errorf("driver of %s: %w", name, err)
	}
	id := filepath.Base(dev)
	reprobeMu.Lock()
	defer reprobeMu.Unlock()
	if reprobed[id] {
		return false, nil
	}
	reprobed[id] = true
	if err := os.WriteFile(filepath.Join(drv, "unbind"), []byte(id), 0); err != nil {
		return false, fmt.Errorf("unbind %s (%s): %w", id, name, err)
	}
	// bind probes synchronously: the disk is back when it returns.
	if err := os.WriteFile(filepath.Join(drv, "bind"), []byte(id), 0); err != nil {
		return false, fmt.Errorf("bind %s (%s): %w", id, name, err)
	}
	return true, nil
}

// sortDisks orders virtio disk names as the kernel assigns them: by
// length, then alphabetically (vdz before vdaa).
func sortDisks(names []string) {
	for i := 1; i < len(names); i++ {
		for j := i; j > 0 && diskLess(names[j], names[j-1]); j-- {
			names[j], names[j-1] = names[j-1], names[j]
		}
	}
}

func diskLess(a, b string) bool {
	if len(a) != len(b) {
		return len(a) < len(b)
	}
	return a < b
}

// mountDevices mounts the container's disks in order and makes their
// directories; each mount point is recorded for teardown.
func (c *Container) mountDevices(ctx context.Context, devs []BlockDevice) error {
	for _, d := range devs {
		p := filepath.Clean(d.Path)
		if !strings.HasPrefix(p, DiskRoot+"/") {
			return fmt.Errorf("disk %q: mount point %q is not below %s: %w", d.Serial, d.Path, DiskRoot, errdefs.ErrInvalidArgument)
		}
		if d.FSType != "erofs" && d.FSType != "ext4" {
			return fmt.Errorf("disk %q: filesystem %q (erofs or ext4 only): %w", d.Serial, d.FSType, errdefs.ErrInvalidArgument)
		}
		dev, err := findDisk(ctx, d.Serial, d.Index)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(p, 0o755); err != nil {
			return fmt.Errorf("disk %q: %w", d.Serial, err)
		}
		c.diskDirs = append(c.diskDirs, p)
		opts := parseMountOptions(d.Options)
		if d.FSType == "erofs" {
			opts.flags |= unix.MS_RDONLY
		}
		if err := unix.Mount(dev, p, d.FSType, opts.flags, opts.data); err != nil {
			return fmt.Errorf("mount disk %q (%s, %s) on %s: %w", d.Serial, dev, d.FSType, p, err)
		}
		c.disks = append(c.disks, p)
		for _, spec := range d.Mkdirs {
			if err := mkdirIn(p, spec); err != nil {
				return fmt.Errorf("disk %q: %w", d.Serial, err)
			}
		}
	}
	return nil
}

// mkdirIn makes "REL[:MODE[:UID:GID]]" inside root (containerd's
// X-containerd.mkdir.path, relative to the disk): an existing directory is
// left as it is, so a writable layer keeps its upper directory across
// containers.
func mkdirIn(root, spec string) error {
	parts := strings.Split(spec, ":")
	if len(parts) > 4 || len(parts) == 3 {
		return fmt.Errorf("mkdir %q: want PATH[:MODE[:UID:GID]]: %w", spec, errdefs.ErrInvalidArgument)
	}
	dir, err := securePath(root, parts[0])
	if err != nil {
		return err
	}
	mode := os.FileMode(0o755)
	if len(parts) > 1 {
		m, err := strconv.ParseUint(parts[1], 8, 32)
		if err != nil || m&^0o7777 != 0 {
			return fmt.Errorf("mkdir %q: bad mode: %w", spec, errdefs.ErrInvalidArgument)
		}
		mode = os.FileMode(m)
	}
	if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
		return nil
	}
	if err := os.MkdirAll(dir, mode); err != nil {
		return fmt.Errorf("mkdir %q: %w", spec, err)
	}
	if err := os.Chmod(dir, mode); err != nil { // MkdirAll honours the umask
		return err
	}
	if len(parts) == 4 {
		uid, err1 := strconv.Atoi(parts[2])
		gid, err2 := strconv.Atoi(parts[3])
		if err1 != nil || err2 != nil {
			return fmt.Errorf("mkdir %q: bad uid/gid: %w", spec, errdefs.ErrInvalidArgument)
		}
		if err := os.Chown(dir, uid, gid); err != nil {
			return fmt.Errorf("mkdir %q: %w", spec, err)
		}
	}
	return nil
}

// unmountDevices undoes mountDevices (after the rootfs is gone), syncing the
// writable layers first so their contents reach the host's image files.
func (c *Container) unmountDevices() {
	if len(c.disks) > 0 {
		unix.Sync()
	}
	for i := len(c.disks) - 1; i >= 0; i-- {
		// Not MNT_DETACH: a lazy unmount would leave the ext4 journal
		// unflushed while the host may already reuse the image.
		if err := unix.Unmount(c.disks[i], 0); err != nil {
			unix.Unmount(c.disks[i], unix.MNT_DETACH)
		}
	}
	c.disks = nil
	for i := len(c.diskDirs) - 1; i >= 0; i-- {
		os.Remove(c.diskDirs[i])
	}
	c.diskDirs = nil
	os.Remove(filepath.Join(DiskRoot, c.ID))
}
