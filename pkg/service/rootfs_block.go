package service

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	apitypes "github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// A block-image root filesystem is what containerd's erofs snapshotter
// hands out in block mode (default_size set; the darwin default): one erofs
// image per layer, an ext4 image for the writable layer and an overlay
// that stacks them, its directories written as templates over the other
// mounts ("{{ mount 0 }}/upper", "{{ overlay 1 3 }}"). Instead of having
// the host loop-mount the images (impossible on macOS), the shim attaches
// each image to the VM as a virtio-blk disk and the agent mounts the disks
// and assembles the overlay. docs/macos.md ("Root filesystem") has the
// details and the containerd source they come from.

// mountCapabilities is the MountCapabilities extension of the shim's
// bootstrap result: what containerd's mount manager must leave to the shim.
// Types: the layer images and the writable image are attached as disks, not
// loop-mounted on the host. Transforms: "format" (the templates) and
// "mkdir" (the overlay's upper and work directories, made on the writable
// image) only make sense once the disks are mounted, in the guest. "mkfs"
// is not claimed: the manager formats the writable image on the host
// (mkfs.ext4) before handing it over, so the guest needs no mkfs.
var mountCapabilities = &apitypes.MountCapabilities{
	Types:      []string{"erofs", "ext4"},
	Transforms: []string{"format", "mkdir"},
}

// guestDiskRoot is where the agent mounts a container's disks: disk mount
// i of container ID at guestDiskRoot/ID/i. The agent only mounts below it.
const guestDiskRoot = "/run/macvm/disks"

// diskFSTypes are the filesystems of image files the shim turns into disks.
var diskFSTypes = map[string]bool{"erofs": true, "ext4": true}

// Prefixes of containerd's mount option extensions (core/mount/manager).
const (
	optMkdirPath = "X-containerd.mkdir.path="
	optExtension = "X-containerd."
)

// blockRootfs is a root filesystem carried by disks: the images to attach
// (in order, from firstDisk on in vm.Config.Disks), how the agent mounts
// them, and the mounts that then make the container's root.
type blockRootfs struct {
	Disks   []vm.Disk
	Devices []*agent.BlockDevice
	Rootfs  []*agent.Mount
}

// isBlockRootfs tells whether mounts are a block-image root filesystem (a
// mount of an erofs or ext4 image, or a containerd mount transform) rather
// than something the host mounts (overlay of host directories, bind).
func isBlockRootfs(mounts []mount.Mount) bool {
	for _, m := range mounts {
		if strings.Contains(m.Type, "/") || diskFSTypes[m.Type] {
			return true
		}
	}
	return false
}

// baseType splits a mount type into its transforms and the base type:
// "format/mkdir/overlay" is [format mkdir] and "overlay".
func baseType(t string) ([]string, string) {
	parts := strings.Split(t, "/")
	return parts[:len(parts)-1], parts[len(parts)-1]
}

// attachBlockRootfs plans container id's block-image root filesystem on
// the pod's VM: its images become disks after those already planned. Disks
// can only be attached when the VM boots (microvm has no hotplug, and
// Virtualization.framework fixes devices at configuration), so only the
// container that boots the VM (boot) may bring them; a later one in a
// running pod gets ErrNotImplemented.
func (sb *sandbox) attachBlockRootfs(id string, mounts []mount.Mount, boot bool) (*blockRootfs, error) {
	if !boot {
		return nil, fmt.Errorf("container %s: its root filesystem is disk images (erofs snapshotter), and disks can only be attached when the pod's VM boots, which it already did: %w",
			id, errdefs.ErrNotImplemented)
	}
	plan, err := planBlockRootfs(mounts, id, len(sb.disks), os.Stat)
	if err != nil {
		return nil, err
	}
	sb.disks = append(sb.disks, plan.Disks...)
	return plan, nil
}

// planBlockRootfs turns the snapshotter's mounts, as containerd's mount
// manager hands them to a shim that claimed mountCapabilities, into disks
// and guest mounts. Every mount but the last must be an image file (a
// disk); the last is the root: an overlay or bind whose templates name the
// disks' guest mount points, or a disk itself. firstDisk is the index the
// first disk gets among the VM's disks (its serial is vm.DiskSerial of it).
// stat is os.Stat outside tests.
func planBlockRootfs(mounts []mount.Mount, containerID string, firstDisk int, stat func(string) (os.FileInfo, error)) (*blockRootfs, error) {
	if len(mounts) == 0 {
		return nil, fmt.Errorf("block root filesystem without mounts: %w", errdefs.ErrInvalidArgument)
	}
	plan := &blockRootfs{}
	// active are the guest mount points of mounts[:i], what "{{ mount i }}"
	// names; sources their host image files.
	var active, sources []string
	for i, m := range mounts {
		transforms, typ := baseType(m.Type)
		last := i == len(mounts)-1
		if diskFSTypes[typ] {
			if len(transforms) > 0 {
				return nil, fmt.Errorf("rootfs mount %d (%s %s): transform %q was left to the shim but only containerd's mount manager applies it (is its mount manager plugin enabled?): %w",
					i, m.Type, m.Source, strings.Join(transforms, "/"), errdefs.ErrNotImplemented)
			}
			dev, disk, err := diskMount(m, i, containerID, firstDisk+len(plan.Disks), stat)
			if err != nil {
				return nil, err
			}
			plan.Disks = append(plan.Disks, disk)
			plan.Devices = append(plan.Devices, dev)
			active = append(active, dev.Path)
			sources = append(sources, m.Source)
			if last {
				// A single image is the root itself (a view of one layer).
				ro := "rw"
				if disk.ReadOnly {
					ro = "ro"
				}
				plan.Rootfs = append(plan.Rootfs, &agent.Mount{Type: "bind", Source: dev.Path, Options: []string{"rbind", ro}})
			}
			continue
		}
		if !last {
			return nil, fmt.Errorf("rootfs mount %d (%s %s): only erofs and ext4 images can come before the root mount: %w",
				i, m.Type, m.Source, errdefs.ErrNotImplemented)
		}
		if typ != "overlay" && typ != "bind" {
			return nil, fmt.Errorf("rootfs mount %d: type %q over disk images: %w", i, m.Type, errdefs.ErrNotImplemented)
		}
		root, err := rootMount(m, typ, active, sources, plan.Devices)
		if err != nil {
			return nil, fmt.Errorf("rootfs mount %d (%s): %w", i, m.Type, err)
		}
		plan.Rootfs = append(plan.Rootfs, root)
	}
	return plan, nil
}

// diskMount is one image file: the disk to attach and how the agent mounts
// it. containerd's "loop" (the host would loop-mount the file) is what the
// disk replaces; X-containerd.* extensions are the host's business.
func diskMount(m mount.Mount, i int, containerID string, index int, stat func(string) (os.FileInfo, error)) (*agent.BlockDevice, vm.Disk, error) {
	if !filepath.IsAbs(m.Source) {
		return nil, vm.Disk{}, fmt.Errorf("rootfs mount %d: %s image %q is not an absolute host path: %w", i, m.Type, m.Source, errdefs.ErrInvalidArgument)
	}
	fi, err := stat(m.Source)
	if err != nil {
		return nil, vm.Disk{}, fmt.Errorf("rootfs mount %d: %s image: %w", i, m.Type, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, vm.Disk{}, fmt.Errorf("rootfs mount %d: %s image %s is not a regular file: %w", i, m.Type, m.Source, errdefs.ErrInvalidArgument)
	}
	var opts []string
	for _, o := range m.Options {
		switch {
		case o == "loop":
		case strings.HasPrefix(o, "device="):
			// An erofs fsmeta addressing its layers as extra devices
			// (the snapshotter's fsmerge); each would be a disk of its own.
			return nil, vm.Disk{}, fmt.Errorf("rootfs mount %d: erofs with extra devices (%s): %w", i, o, errdefs.ErrNotImplemented)
		case strings.HasPrefix(o, optExtension):
			// e.g. X-containerd.dmverity=: verity is not set up in the
			// guest (see docs/macos.md).
		default:
			opts = append(opts, o)
		}
	}
	ro := isReadOnly(m.Options)
	if m.Type == "erofs" {
		ro = true // erofs is a read-only filesystem whatever the options say
	}
	dev := &agent.BlockDevice{
		Serial:  vm.DiskSerial(index),
		Index:   uint32(index),
		Fstype:  m.Type,
		Options: opts,
		Path:    path.Join(guestDiskRoot, containerID, fmt.Sprint(i)),
	}
	return dev, vm.Disk{Path: filepath.Clean(m.Source), ReadOnly: ro}, nil
}

// rootMount resolves the root mount's templates over the disks' guest mount
// points and moves its mkdir requests to the disks they fall on.
func rootMount(m mount.Mount, typ string, active, sources []string, devs []*agent.BlockDevice) (*agent.Mount, error) {
	var opts []string
	for _, o := range m.Options {
		v, err := formatTemplate(o, active, sources)
		if err != nil {
			return nil, err
		}
		if dir, ok := strings.CutPrefix(v, optMkdirPath); ok {
			if err := addMkdir(dir, devs); err != nil {
				return nil, err
			}
			continue
		}
		if strings.HasPrefix(v, optExtension) {
			continue
		}
		opts = append(opts, v)
	}
	src, err := formatTemplate(m.Source, active, sources)
	if err != nil {
		return nil, err
	}
	if typ == "bind" {
		if !isUnder(src, devs) {
			return nil, fmt.Errorf("bind source %q is not on a disk of the rootfs: %w", src, errdefs.ErrNotImplemented)
		}
		return &agent.Mount{Type: "bind", Source: src, Options: opts}, nil
	}
	for _, o := range opts {
		k, v, _ := strings.Cut(o, "=")
		switch k {
		case "lowerdir", "upperdir", "workdir":
			for _, d := range strings.Split(v, ":") {
				if !isUnder(d, devs) {
					return nil, fmt.Errorf("overlay %s %q is not on a disk of the rootfs (a host directory cannot be an overlay layer in the VM; configure the erofs snapshotter with default_size): %w",
						k, d, errdefs.ErrNotImplemented)
				}
			}
		}
	}
	return &agent.Mount{Type: "overlay", Source: "overlay", Options: opts}, nil
}

// addMkdir records "DIR[:MODE[:UID:GID]]" on the disk whose mount point
// holds DIR, relative to it.
func addMkdir(spec string, devs []*agent.BlockDevice) error {
	dir, rest, _ := strings.Cut(spec, ":")
	for _, d := range devs {
		if rel, ok := strings.CutPrefix(path.Clean(dir), d.Path+"/"); ok {
			if rest != "" {
				rel += ":" + rest
			}
			d.Mkdirs = append(d.Mkdirs, rel)
			return nil
		}
	}
	return fmt.Errorf("mkdir %q is not on a disk of the rootfs: %w", dir, errdefs.ErrNotImplemented)
}

func isUnder(p string, devs []*agent.BlockDevice) bool {
	p = path.Clean(p)
	for _, d := range devs {
		if p == d.Path || strings.HasPrefix(p, d.Path+"/") {
			return true
		}
	}
	return false
}
