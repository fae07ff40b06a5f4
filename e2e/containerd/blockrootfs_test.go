package containerd_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/macvm/macvm/e2e/harness"
)

// TestErofsBlockRootfs runs the busybox image from containerd's erofs
// snapshotter in block mode: the shim announces MountCapabilities, so the
// mount manager only formats the writable ext4 image and hands the rest
// over; the layer (an erofs image made by the snapshotter with mkfs.erofs)
// and the writable image become virtio-blk disks, and the agent assembles
// the overlay. Nothing of the root filesystem is mounted on the host. The
// container's write is then read from the ext4 image on the host.
func TestErofsBlockRootfs(t *testing.T) {
	for _, tool := range []string{"mkfs.erofs", "mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (Debian's erofs-utils and e2fsprogs; hack/with-deps installs them): %v", tool, err)
		}
	}
	forEachRuntime(t, true, func(t *testing.T, rt harness.Runtime) {
		d := daemonWith(t, rt, harness.Options{Paths: suite.Paths, ErofsWritableSize: "64M"}, "--snapshotter", "erofs")
		snap := []string{"--snapshotter", "erofs"}

		// The root is an overlay of the disks' mount points in the guest.
		res := run(t, d, rt, nil, snap, "erofs-rm", "sh", "-c", "grep ' / ' /proc/mounts; echo hello from erofs")
		if res.ExitCode != 0 || !strings.HasSuffix(string(res.Stdout), "hello from erofs\n") {
			t.Fatalf("ctr run --snapshotter erofs: %v", res)
		}
		root := string(res.Stdout)
		t.Logf("the container's root: %s", strings.SplitN(root, "\n", 2)[0])
		if !strings.HasPrefix(root, "overlay / overlay ") || !regexp.MustCompile(`lowerdir=/run/macvm/disks/erofs-rm/1\b`).MatchString(root) ||
			!strings.Contains(root, "upperdir=/run/macvm/disks/erofs-rm/0/upper") {
			t.Errorf("the container's root is not the overlay of the disks: %q", root)
		}

		// A container kept after its task: its writable image holds the write.
		res = ctr(t, d, nil, d.RunArgs(rt, snap, "erofs-keep", "sh", "-c", "echo written >/root/new && cat /root/new")...)
		if res.ExitCode != 0 || string(res.Stdout) != "written\n" {
			t.Fatalf("write in the container: %v", res)
		}
		// The container's active snapshot is the one with a writable image
		// and no layer blob (a committed layer has layer.erofs); asking ctr
		// for its mounts would have the mount manager mount them on the host.
		imgs, _ := filepath.Glob(filepath.Join(d.Root, "io.containerd.snapshotter.v1.erofs", "snapshots", "*", "rwlayer.img"))
		var active []string
		for _, img := range imgs {
			if _, err := os.Stat(filepath.Join(filepath.Dir(img), "layer.erofs")); os.IsNotExist(err) {
				active = append(active, img)
			}
		}
		if len(active) != 1 {
			t.Fatalf("want the writable image of one active snapshot, got %v (of %v)", active, imgs)
		}
		img := active[0]
		t.Logf("writable image: %s", img)
		got, err := harness.Output(exec.Command("debugfs", "-R", "cat /upper/root/new", img))
		if err != nil || string(got) != "written\n" {
			t.Errorf("the write in %s: %q, %v; want %q", img, got, err, "written\n")
		}
		ctrOK(t, d, "containers", "rm", "erofs-keep")
	})
}

// TestWarmStartBlockRootfs: a VM whose root filesystem is disks (erofs
// snapshotter in block mode) starts from a template booted with empty
// stand-in disks of the same count and read-only flags: the first
// container boots cold and leaves the template, the next one is a clone
// whose agent re-probes the disks it finds empty, mounts the container's
// images and runs from them (its root is the overlay of the disks, a
// layer's file is read, a write lands in the writable image).
func TestWarmStartBlockRootfs(t *testing.T) {
	for _, tool := range []string{"mkfs.erofs", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (Debian's erofs-utils and e2fsprogs; hack/with-deps installs them): %v", tool, err)
		}
	}
	rt := harness.Macvm()
	// pool_size = 0 (template clones) until the pool part below.
	d := daemonWith(t, rt, harness.Options{Paths: suite.Paths, ErofsWritableSize: "64M", WarmStart: "pool", MacvmConfigExtra: "pool_size = 0"},
		"--snapshotter", "erofs")
	snap := []string{"--snapshotter", "erofs"}
	script := "grep ' / ' /proc/mounts; cat /sys/block/vd*/size; echo written >/root/new && cat /root/new; ls /bin/busybox"
	runDisks := func(id string) (string, string) {
		t.Helper()
		res := run(t, d, rt, nil, snap, id, "sh", "-c", script)
		out := string(res.Stdout)
		if res.ExitCode != 0 || !strings.HasSuffix(out, "written\n/bin/busybox\n") {
			t.Fatalf("ctr run --snapshotter erofs %s: %v", id, res)
		}
		return out, startMode(t, d, id)
	}
	if _, mode := runDisks("werofs-cold"); mode != "cold" {
		t.Fatalf("first container: start_mode=%s, want cold", mode)
	}
	key := waitTemplate(t, d, "")
	checkDisks := func(id, want string) {
		t.Helper()
		out, mode := runDisks(id)
		if mode != want {
			t.Fatalf("%s: start_mode=%s, want %s", id, mode, want)
		}
		t.Logf("in %s (%s):\n%s", id, mode, out)
		if !strings.HasPrefix(out, "overlay / overlay ") || !strings.Contains(out, "upperdir=/run/macvm/disks/"+id+"/0/upper") {
			t.Errorf("%s: the root is not the overlay of its disks: %q", id, out)
		}
		for _, l := range strings.Split(out, "\n") {
			if l == "0" {
				t.Errorf("%s: a disk still has no capacity: %q", id, out)
			}
		}
	}
	checkDisks("werofs-clone", "template")

	// The pool (pool_size = 1; each shim reads the config when it
	// starts): a template clone starts the daemon, whose VMs have empty
	// stand-in disks; the next container's images are swapped in.
	if err := harness.WriteMacvmConfigExtra(d.MacvmConfig, suite.Paths, "pool", d.TemplateDir, "pool_size = 1"); err != nil {
		t.Fatal(err)
	}
	checkDisks("werofs-seed", "template")
	waitPool(t, filepath.Join(d.TemplateDir, "pool"), key, 1)
	checkDisks("werofs-pool", "pool")
	stopPoolClean(t, d)
}
