package container

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/vm"
)

// fakeSysBlock lays out /sys/block with the given disks (name -> serial;
// "" means the device has no serial file).
func fakeSysBlock(t *testing.T, disks map[string]string) {
	t.Helper()
	dir := t.TempDir()
	for name, serial := range disks {
		if err := os.MkdirAll(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if serial != "" {
			if err := os.WriteFile(filepath.Join(dir, name, "serial"), []byte(serial+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	old := sysBlock
	sysBlock = dir
	t.Cleanup(func() { sysBlock = old })
}

func TestLookupDiskBySerial(t *testing.T) {
	// The serials do not follow the names: identity, not order, decides.
	fakeSysBlock(t, map[string]string{"vda": "disk2", "vdb": "disk0", "vdc": "disk1", "loop0": ""})
	for serial, want := range map[string]string{"disk0": "/dev/vdb", "disk1": "/dev/vdc", "disk2": "/dev/vda"} {
		got, err := lookupDisk(serial, 0)
		if err != nil || got != want {
			t.Errorf("lookupDisk(%q) = %q, %v; want %q", serial, got, err, want)
		}
	}
	if _, err := lookupDisk("disk3", 3); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("missing serial: got %v, want NotFound (no fallback to the index when disks have serials)", err)
	}
}

func TestLookupDiskByIndexWithoutSerials(t *testing.T) {
	names := map[string]string{}
	for _, n := range []string{"vda", "vdb", "vdz", "vdaa"} {
		names[n] = ""
	}
	fakeSysBlock(t, names)
	for i, want := range []string{"/dev/vda", "/dev/vdb", "/dev/vdz", "/dev/vdaa"} {
		got, err := lookupDisk("disk", i)
		if err != nil || got != want {
			t.Errorf("index %d: got %q, %v; want %q", i, got, err, want)
		}
	}
	if _, err := lookupDisk("disk", 4); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("index past the disks: got %v", err)
	}
}

func TestFindDiskWaitsForTheDevice(t *testing.T) {
	fakeSysBlock(t, map[string]string{})
	go func() {
		time.Sleep(100 * time.Millisecond)
		os.MkdirAll(filepath.Join(sysBlock, "vda"), 0o755)
		os.WriteFile(filepath.Join(sysBlock, "vda", "serial"), []byte("disk0"), 0o644)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if got, err := findDisk(ctx, "disk0", 0); err != nil || got != "/dev/vda" {
		t.Fatalf("findDisk = %q, %v", got, err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := findDisk(ctx, "disk9", 9); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("findDisk of a missing disk: %v", err)
	}
}

func TestMkdirIn(t *testing.T) {
	root := t.TempDir()
	for _, spec := range []string{"upper:0755", "work:0700", "a/b", "upper:0700"} {
		if err := mkdirIn(root, spec); err != nil {
			t.Fatalf("mkdirIn(%q): %v", spec, err)
		}
	}
	for p, want := range map[string]os.FileMode{"upper": 0o755, "work": 0o700, "a/b": 0o755} {
		fi, err := os.Stat(filepath.Join(root, p))
		if err != nil || !fi.IsDir() || fi.Mode().Perm() != want {
			t.Errorf("%s: %v %v, want a directory with mode %o", p, fi.Mode(), err, want)
		}
	}
	// A symlink in the filesystem cannot lead the mkdir out of it.
	if err := os.Symlink("/", filepath.Join(root, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := mkdirIn(root, "escape/macvm-blk-test"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "macvm-blk-test")); err != nil {
		t.Errorf("the symlinked mkdir did not stay inside the root: %v", err)
	}
	for _, bad := range []string{"x:9z", "x:0755:1", "x:0755:a:b", "x:1:2:3:4"} {
		if err := mkdirIn(root, bad); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("mkdirIn(%q) = %v, want InvalidArgument", bad, err)
		}
	}
}

func TestSortDisks(t *testing.T) {
	got := []string{"vdaa", "vdb", "vda", "vdz"}
	sortDisks(got)
	if want := []string{"vda", "vdb", "vdz", "vdaa"}; !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// A disk the guest sees with no capacity (a warm-start template's empty
// stand-in) is re-probed once through its driver's unbind and bind; a
// disk with a capacity, or one re-probed already, is used as it is.
func TestLookupDiskReprobesEmptyDisk(t *testing.T) {
	fakeSysBlock(t, map[string]string{"vda": "disk0", "vdb": "disk1"})
	root := filepath.Dir(sysBlock)
	drv := filepath.Join(root, "drivers", "virtio_blk")
	for _, d := range []string{drv, filepath.Join(root, "devices", "virtio3"), filepath.Join(root, "devices", "virtio4")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"unbind", "bind"} {
		os.WriteFile(filepath.Join(drv, f), nil, 0o200)
	}
	for name, dev := range map[string]string{"vda": "virtio3", "vdb": "virtio4"} {
		os.Symlink(filepath.Join(root, "devices", dev), filepath.Join(sysBlock, name, "device"))
		os.Symlink(drv, filepath.Join(root, "devices", dev, "driver"))
	}
	os.WriteFile(filepath.Join(sysBlock, "vda", "size"), []byte("0\n"), 0o644)
	os.WriteFile(filepath.Join(sysBlock, "vdb", "size"), []byte("131072\n"), 0o644)
	t.Cleanup(func() { delete(reprobed, "virtio3"); delete(reprobed, "virtio4") })

	if got, err := lookupDisk("disk1", 1); err != nil || got != "/dev/vdb" {
		t.Errorf("disk with a capacity: %q, %v; want /dev/vdb at once", got, err)
	}
	if _, err := lookupDisk("disk0", 0); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("empty disk: %v, want NotFound while it is re-probed", err)
	}
	for _, f := range []string{"unbind", "bind"} {
		if b, _ := os.ReadFile(filepath.Join(drv, f)); string(b) != "virtio3" {
			t.Errorf("%s got %q, want virtio3", f, b)
		}
	}
	// Still empty after the re-probe: an empty disk, used as it is.
	if got, err := lookupDisk("disk0", 0); err != nil || got != "/dev/vda" {
		t.Errorf("after the re-probe: %q, %v; want /dev/vda", got, err)
	}
}

// Both backends' stand-ins are re-probed: QEMU's empty files and
// Virtualization.framework's vm.StandInDiskBytes images; a disk with any
// larger capacity is not.
func TestReprobeStandInCapacities(t *testing.T) {
	if vm.StandInDiskBytes > standInSectors*512 || vm.StandInDiskBytes%512 != 0 {
		t.Fatalf("vm.StandInDiskBytes %d is not whole sectors within the agent's %d-sector stand-in bound",
			vm.StandInDiskBytes, standInSectors)
	}
	sizes := map[string]string{
		"vda": "0",                                     // QEMU's empty stand-in
		"vdb": strconv.Itoa(vm.StandInDiskBytes / 512), // Virtualization.framework's
		"vdc": strconv.Itoa(standInSectors + 1),        // too big for a stand-in
		"vdd": "131072",                                // a 64 MiB image
	}
	want := map[string]bool{"vda": true, "vdb": true, "vdc": false, "vdd": false}
	disks := map[string]string{}
	for name := range sizes {
		disks[name] = "serial-" + name
	}
	fakeSysBlock(t, disks)
	root := filepath.Dir(sysBlock)
	drv := filepath.Join(root, "drivers", "virtio_blk")
	if err := os.MkdirAll(drv, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, size := range sizes {
		dev := filepath.Join(root, "devices", "virtio-"+name)
		if err := os.MkdirAll(dev, 0o755); err != nil {
			t.Fatal(err)
		}
		os.Symlink(dev, filepath.Join(sysBlock, name, "device"))
		os.Symlink(drv, filepath.Join(dev, "driver"))
		os.WriteFile(filepath.Join(sysBlock, name, "size"), []byte(size+"\n"), 0o644)
		t.Cleanup(func() { delete(reprobed, "virtio-"+name) })
	}
	for _, name := range []string{"vda", "vdb", "vdc", "vdd"} {
		os.WriteFile(filepath.Join(drv, "bind"), nil, 0o600)
		got, err := reprobe(name)
		if err != nil || got != want[name] {
			t.Errorf("%s with %s sectors: re-probed %v, %v; want %v", name, sizes[name], got, err, want[name])
		}
		b, _ := os.ReadFile(filepath.Join(drv, "bind"))
		if bound := string(b) == "virtio-"+name; bound != want[name] {
			t.Errorf("%s: bind got %q, want a bind %v", name, b, want[name])
		}
	}
}
