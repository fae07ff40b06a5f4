package service

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	apitypes "github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

type fakeFile struct{ mode fs.FileMode }

func (f fakeFile) Name() string       { return "f" }
func (f fakeFile) Size() int64        { return 1 << 20 }
func (f fakeFile) Mode() fs.FileMode  { return f.mode }
func (f fakeFile) ModTime() time.Time { return time.Time{} }
func (f fakeFile) IsDir() bool        { return f.mode.IsDir() }
func (f fakeFile) Sys() any           { return nil }

func fakeStat(p string) (os.FileInfo, error) {
	switch p {
	case "/missing.erofs":
		return nil, os.ErrNotExist
	case "/dir":
		return fakeFile{fs.ModeDir}, nil
	}
	return fakeFile{0}, nil
}

const snaps = "/var/lib/containerd/io.containerd.snapshotter.v1.erofs/snapshots"

// What containerd's mount manager hands a shim that claims
// mountCapabilities, for an active snapshot of a three-layer image from
// the erofs snapshotter in block mode (plugins/snapshots/erofs
// overlayMounts): the manager applied mkfs, the rest is ours.
var threeLayers = []mount.Mount{
	{Type: "ext4", Source: snaps + "/9/rwlayer.img", Options: []string{"rw", "loop"}},
	{Type: "erofs", Source: snaps + "/3/layer.erofs", Options: []string{"ro", "loop"}},
	{Type: "erofs", Source: snaps + "/2/layer.erofs", Options: []string{"ro", "loop", "X-containerd.dmverity=" + snaps + "/2/layer.erofs.dmverity"}},
	{Type: "erofs", Source: snaps + "/1/layer.erofs", Options: []string{"ro", "loop"}},
	{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
		"X-containerd.mkdir.path={{ mount 0 }}/upper:0755",
		"X-containerd.mkdir.path={{ mount 0 }}/work:0755",
		"workdir={{ mount 0 }}/work",
		"upperdir={{ mount 0 }}/upper",
		"lowerdir={{ overlay 1 3 }}",
	}},
}

func TestPlanBlockRootfs(t *testing.T) {
	d := guestDiskRoot + "/c1/"
	for _, tt := range []struct {
		name      string
		mounts    []mount.Mount
		firstDisk int
		want      *blockRootfs
	}{{
		name:   "three layers and a writable image",
		mounts: threeLayers,
		want: &blockRootfs{
			Disks: []vm.Disk{
				{Path: snaps + "/9/rwlayer.img"},
				{Path: snaps + "/3/layer.erofs", ReadOnly: true},
				{Path: snaps + "/2/layer.erofs", ReadOnly: true},
				{Path: snaps + "/1/layer.erofs", ReadOnly: true},
			},
			Devices: []*agent.BlockDevice{
				{Serial: "disk0", Index: 0, Fstype: "ext4", Options: []string{"rw"}, Path: d + "0", Mkdirs: []string{"upper:0755", "work:0755"}},
				{Serial: "disk1", Index: 1, Fstype: "erofs", Options: []string{"ro"}, Path: d + "1"},
				{Serial: "disk2", Index: 2, Fstype: "erofs", Options: []string{"ro"}, Path: d + "2"},
				{Serial: "disk3", Index: 3, Fstype: "erofs", Options: []string{"ro"}, Path: d + "3"},
			},
			Rootfs: []*agent.Mount{{Type: "overlay", Source: "overlay", Options: []string{
				"workdir=" + d + "0/work", "upperdir=" + d + "0/upper", "lowerdir=" + d + "1:" + d + "2:" + d + "3",
			}}},
		},
	}, {
		name: "one layer, after two disks of another container",
		mounts: []mount.Mount{
			{Type: "ext4", Source: "/s/2/rwlayer.img", Options: []string{"rw", "loop"}},
			{Type: "erofs", Source: "/s/1/layer.erofs", Options: []string{"ro", "loop"}},
			{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
				"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
				"workdir={{ mount 0 }}/work", "upperdir={{ mount 0 }}/upper", "lowerdir={{ mount 1 }}",
			}},
		},
		firstDisk: 2,
		want: &blockRootfs{
			Disks: []vm.Disk{{Path: "/s/2/rwlayer.img"}, {Path: "/s/1/layer.erofs", ReadOnly: true}},
			Devices: []*agent.BlockDevice{
				{Serial: "disk2", Index: 2, Fstype: "ext4", Options: []string{"rw"}, Path: d + "0", Mkdirs: []string{"upper:0755", "work:0755"}},
				{Serial: "disk3", Index: 3, Fstype: "erofs", Options: []string{"ro"}, Path: d + "1"},
			},
			Rootfs: []*agent.Mount{{Type: "overlay", Source: "overlay", Options: []string{
				"workdir=" + d + "0/work", "upperdir=" + d + "0/upper", "lowerdir=" + d + "1",
			}}},
		},
	}, {
		name:   "a view of one layer",
		mounts: []mount.Mount{{Type: "erofs", Source: "/s/1/layer.erofs", Options: []string{"ro", "loop"}}},
		want: &blockRootfs{
			Disks:   []vm.Disk{{Path: "/s/1/layer.erofs", ReadOnly: true}},
			Devices: []*agent.BlockDevice{{Serial: "disk0", Fstype: "erofs", Options: []string{"ro"}, Path: d + "0"}},
			Rootfs:  []*agent.Mount{{Type: "bind", Source: d + "0", Options: []string{"rbind", "ro"}}},
		},
	}, {
		name: "an empty writable image (no parent)",
		mounts: []mount.Mount{
			{Type: "ext4", Source: "/s/1/rwlayer.img", Options: []string{"rw", "loop"}},
			{Type: "format/mkdir/bind", Source: "{{ mount 0 }}/upper", Options: []string{"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "rw", "rbind"}},
		},
		want: &blockRootfs{
			Disks:   []vm.Disk{{Path: "/s/1/rwlayer.img"}},
			Devices: []*agent.BlockDevice{{Serial: "disk0", Fstype: "ext4", Options: []string{"rw"}, Path: d + "0", Mkdirs: []string{"upper:0755"}}},
			Rootfs:  []*agent.Mount{{Type: "bind", Source: d + "0/upper", Options: []string{"rw", "rbind"}}},
		},
	}, {
		name: "read-only view of two layers, lowers in reverse",
		mounts: []mount.Mount{
			{Type: "erofs", Source: "/s/1/layer.erofs", Options: []string{"ro", "loop"}},
			{Type: "erofs", Source: "/s/2/layer.erofs", Options: []string{"ro", "loop"}},
			{Type: "format/overlay", Source: "overlay", Options: []string{"ro", "lowerdir={{ overlay 1 0 }}"}},
		},
		want: &blockRootfs{
			Disks: []vm.Disk{{Path: "/s/1/layer.erofs", ReadOnly: true}, {Path: "/s/2/layer.erofs", ReadOnly: true}},
			Devices: []*agent.BlockDevice{
				{Serial: "disk0", Fstype: "erofs", Options: []string{"ro"}, Path: d + "0"},
				{Serial: "disk1", Index: 1, Fstype: "erofs", Options: []string{"ro"}, Path: d + "1"},
			},
			Rootfs: []*agent.Mount{{Type: "overlay", Source: "overlay", Options: []string{"ro", "lowerdir=" + d + "1:" + d + "0"}}},
		},
	}} {
		got, err := planBlockRootfs(tt.mounts, "c1", tt.firstDisk, fakeStat)
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if !reflect.DeepEqual(got.Disks, tt.want.Disks) {
			t.Errorf("%s: disks\n got %+v\nwant %+v", tt.name, got.Disks, tt.want.Disks)
		}
		if len(got.Devices) != len(tt.want.Devices) {
			t.Errorf("%s: %d devices, want %d", tt.name, len(got.Devices), len(tt.want.Devices))
		} else {
			for i := range got.Devices {
				g, w := got.Devices[i], tt.want.Devices[i]
				if g.Serial != w.Serial || g.Index != w.Index || g.Fstype != w.Fstype || g.Path != w.Path ||
					!reflect.DeepEqual(g.Options, w.Options) || !reflect.DeepEqual(g.Mkdirs, w.Mkdirs) {
					t.Errorf("%s: device %d\n got %v\nwant %v", tt.name, i, g, w)
				}
			}
		}
		if len(got.Rootfs) != len(tt.want.Rootfs) {
			t.Errorf("%s: rootfs %v, want %v", tt.name, got.Rootfs, tt.want.Rootfs)
			continue
		}
		for i := range got.Rootfs {
			g, w := got.Rootfs[i], tt.want.Rootfs[i]
			if g.Type != w.Type || g.Source != w.Source || g.Target != w.Target || !reflect.DeepEqual(g.Options, w.Options) {
				t.Errorf("%s: rootfs mount %d\n got %v\nwant %v", tt.name, i, g, w)
			}
		}
	}
}

func TestPlanBlockRootfsErrors(t *testing.T) {
	for _, tt := range []struct {
		name   string
		mounts []mount.Mount
		want   error
	}{
		{"no mounts", nil, errdefs.ErrInvalidArgument},
		{"mkfs left to the shim", []mount.Mount{{Type: "mkfs/ext4", Source: "/s/rw.img", Options: []string{"X-containerd.mkfs.size=64M"}}}, errdefs.ErrNotImplemented},
		{"relative image", []mount.Mount{{Type: "erofs", Source: "layer.erofs"}}, errdefs.ErrInvalidArgument},
		{"missing image", []mount.Mount{{Type: "erofs", Source: "/missing.erofs"}}, os.ErrNotExist},
		{"image is a directory", []mount.Mount{{Type: "ext4", Source: "/dir"}}, errdefs.ErrInvalidArgument},
		{"erofs fsmeta with devices", []mount.Mount{{Type: "erofs", Source: "/s/fsmeta.erofs", Options: []string{"ro", "loop", "device=/s/1/layer.erofs"}}}, errdefs.ErrNotImplemented},
		{"host upper directory (erofs snapshotter without default_size)", []mount.Mount{
			{Type: "erofs", Source: "/s/1/layer.erofs", Options: []string{"ro", "loop"}},
			{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{"workdir=/s/2/work", "upperdir=/s/2/fs", "lowerdir={{ mount 0 }}"}},
		}, errdefs.ErrNotImplemented},
		{"host directory before the root", []mount.Mount{
			{Type: "bind", Source: "/dir"},
			{Type: "format/overlay", Source: "overlay", Options: []string{"lowerdir={{ mount 0 }}"}},
		}, errdefs.ErrNotImplemented},
		{"template out of range", []mount.Mount{
			{Type: "erofs", Source: "/s/1/layer.erofs"},
			{Type: "format/overlay", Source: "overlay", Options: []string{"lowerdir={{ overlay 0 4 }}"}},
		}, errdefs.ErrInvalidArgument},
		{"mkdir off the disks", []mount.Mount{
			{Type: "ext4", Source: "/s/rw.img"},
			{Type: "format/mkdir/bind", Source: "{{ mount 0 }}", Options: []string{"X-containerd.mkdir.path=/elsewhere:0755"}},
		}, errdefs.ErrNotImplemented},
		{"unknown root type", []mount.Mount{
			{Type: "erofs", Source: "/s/1/layer.erofs"},
			{Type: "format/squashfs", Source: "{{ mount 0 }}"},
		}, errdefs.ErrNotImplemented},
	} {
		_, err := planBlockRootfs(tt.mounts, "c1", 0, fakeStat)
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: got %v, want %v", tt.name, err, tt.want)
		}
	}
}

func TestIsBlockRootfs(t *testing.T) {
	for _, tt := range []struct {
		mounts []mount.Mount
		want   bool
	}{
		{threeLayers, true},
		{[]mount.Mount{{Type: "erofs", Source: "/l.erofs"}}, true},
		{[]mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b"}}}, false},
		{[]mount.Mount{{Type: "bind", Source: "/snap/fs", Options: []string{"rbind"}}}, false},
		{nil, false},
	} {
		if got := isBlockRootfs(tt.mounts); got != tt.want {
			t.Errorf("isBlockRootfs(%v) = %v, want %v", tt.mounts, got, tt.want)
		}
	}
}

// TestBlockRootfsInPod creates containers through the Task API with the
// erofs snapshotter's mounts: the pod's first container boots the VM with
// its images as disks and the agent gets the devices and the overlay, with
// nothing mounted on the host; a later container of the pod that brings
// disks is refused (no hotplug), one with a directory rootfs still joins.
func TestBlockRootfsInPod(t *testing.T) {
	h := newHarness(t, nil)
	images := t.TempDir()
	blockMounts := func(id string) []*apitypes.Mount {
		rw, layer := filepath.Join(images, id+"-rw.img"), filepath.Join(images, id+"-layer.erofs")
		for _, f := range []string{rw, layer} {
			if err := os.WriteFile(f, []byte("image"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return []*apitypes.Mount{
			{Type: "ext4", Source: rw, Options: []string{"rw", "loop"}},
			{Type: "erofs", Source: layer, Options: []string{"ro", "loop"}},
			{Type: "format/mkdir/overlay", Source: "overlay", Options: []string{
				"X-containerd.mkdir.path={{ mount 0 }}/upper:0755", "X-containerd.mkdir.path={{ mount 0 }}/work:0755",
				"workdir={{ mount 0 }}/work", "upperdir={{ mount 0 }}/upper", "lowerdir={{ mount 1 }}",
			}},
		}
	}
	h.create("pause", &taskAPI.CreateTaskRequest{Rootfs: blockMounts("pause")})
	want := []vm.Disk{{Path: filepath.Join(images, "pause-rw.img")}, {Path: filepath.Join(images, "pause-layer.erofs"), ReadOnly: true}}
	if got := h.machine(0).cfg.Disks; !reflect.DeepEqual(got, want) {
		t.Errorf("VM disks %+v, want %+v", got, want)
	}
	if h.machine(0).cfg.Templates == nil {
		// Templates are booted with stand-in disks (pkg/vm).
		t.Error("a VM with disks asked for no template, with warm start on")
	}
	h.agent.mu.Lock()
	req := h.agent.creates["pause"]
	h.agent.mu.Unlock()
	if len(req.GetBlockDevices()) != 2 || req.BlockDevices[0].Serial != "disk0" || req.BlockDevices[1].Fstype != "erofs" ||
		len(req.GetRootfs()) != 1 || req.Rootfs[0].Type != "overlay" {
		t.Errorf("agent request: devices %v, rootfs %v", req.GetBlockDevices(), req.GetRootfs())
	}
	if h.mnt.count() != 0 {
		t.Errorf("%d host mounts for a block-image rootfs, want none", h.mnt.count())
	}

	r := &taskAPI.CreateTaskRequest{ID: "app", Bundle: h.bundle("app", nil), Rootfs: blockMounts("app"), Options: h.opts}
	// NotImplemented from Create would make containerd fall back to task
	// API v2: the service turns it into FailedPrecondition.
	if _, err := h.svc.Create(h.ctx, r); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) || !strings.Contains(err.Error(), "disks can only be attached when the pod's VM boots") {
		t.Errorf("a second container with disks in a running pod: %v, want FailedPrecondition naming the disks", err)
	}
	h.create("sidecar", nil)
	if n := len(h.machines); n != 1 {
		t.Errorf("%d VMs, want 1", n)
	}
}
