package guest_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// TestBlockRootfs boots a VM with a block-image root filesystem as
// containerd's erofs snapshotter lays it out: two erofs layers made with
// mkfs.erofs (busybox below, a layer overriding and adding files above)
// and an ext4 writable image, attached as virtio-blk disks in an order
// that differs from the layer order, so only the serials can match them.
// The agent mounts them and assembles the overlay; the container sees the
// merged tree, its writes land in the ext4 image (read on the host after
// the VM is gone) and the layer images are unchanged.
func TestBlockRootfs(t *testing.T) {
	for _, tool := range []string{"mkfs.erofs", "mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (Debian's erofs-utils and e2fsprogs; hack/with-deps installs them): %v", tool, err)
		}
	}
	dir := t.TempDir()
	bottom := filepath.Join(dir, "bottom.erofs")
	top := filepath.Join(dir, "top.erofs")
	rw := filepath.Join(dir, "rwlayer.img")

	base := busyboxRootfs(t)
	writeFile(t, filepath.Join(base, "etc", "motd"), "bottom\n")
	writeFile(t, filepath.Join(base, "etc", "only-bottom"), "kept\n")
	mkfs(t, "mkfs.erofs", "-Enoinline_data", bottom, base)
	upper := t.TempDir()
	writeFile(t, filepath.Join(upper, "etc", "motd"), "top\n")
	writeFile(t, filepath.Join(upper, "etc", "only-top"), "layer 2\n")
	mkfs(t, "mkfs.erofs", "-Enoinline_data", top, upper)
	f, err := os.Create(rw)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	mkfs(t, "mkfs.ext4", "-q", rw)
	sums := map[string][32]byte{bottom: fileSum(t, bottom), top: fileSum(t, top)}

	// Disk order: bottom layer, writable image, top layer (serials disk0..2).
	cfg := vmConfig(t)
	cfg.Disks = []vm.Disk{{Path: bottom, ReadOnly: true}, {Path: rw}, {Path: top, ReadOnly: true}}
	v := bootVMWith(t, &cfg)
	const root = "/run/macvm/disks/blk1/"
	devices := []*agent.BlockDevice{
		{Serial: vm.DiskSerial(1), Index: 1, Fstype: "ext4", Options: []string{"rw"}, Path: root + "0", Mkdirs: []string{"upper:0755", "work:0755"}},
		{Serial: vm.DiskSerial(2), Index: 2, Fstype: "erofs", Options: []string{"ro"}, Path: root + "1"},
		{Serial: vm.DiskSerial(0), Index: 0, Fstype: "erofs", Options: []string{"ro"}, Path: root + "2"},
	}
	rootfs := []*agent.Mount{{Type: "overlay", Source: "overlay", Options: []string{
		"workdir=" + root + "0/work", "upperdir=" + root + "0/upper", "lowerdir=" + root + "1:" + root + "2",
	}}}
	spec := defaultSpec("sh", "-c", "cat /etc/motd /etc/only-top /etc/only-bottom && echo written >/root/new && rm /etc/only-bottom && ls /etc/only-bottom 2>&1; cat /root/new")
	p := v.createOn(t, "blk1", spec, false, devices, rootfs)
	v.start(t, p)
	status := v.wait(t, p)
	out, errOut := p.stdout.wait(t), p.stderr.wait(t)
	if status != 0 {
		t.Fatalf("exit %d, stdout %q, stderr %q\nconsole:\n%s", status, out, errOut, v.m.ConsoleTail(2048))
	}
	if want := "top\nlayer 2\nkept\nls: /etc/only-bottom: No such file or directory\nwritten\n"; out != want {
		t.Errorf("stdout %q, want %q (stderr %q)", out, want, errOut)
	}

	// A bad request: a mount point outside the disk root is refused.
	specJSON, err := json.Marshal(defaultSpec("true"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.client.CreateContainer(rpcCtx(t), &agent.CreateContainerRequest{
		ContainerId:  "blk-bad",
		Spec:         specJSON,
		BlockDevices: []*agent.BlockDevice{{Serial: vm.DiskSerial(0), Fstype: "erofs", Path: "/etc"}},
		Rootfs:       rootfs,
	})
	if err == nil || !strings.Contains(err.Error(), "not below /run/macvm/disks") {
		t.Errorf("disk mounted on /etc: got %v, want a refusal", err)
	}

	// Delete unmounts the disks (syncing the writable one); then the VM goes.
	if _, err := v.client.DeleteContainer(rpcCtx(t), &agent.DeleteContainerRequest{ContainerId: "blk1"}); err != nil {
		t.Fatalf("DeleteContainer: %v", err)
	}
	v.client.Shutdown(rpcCtx(t), &emptypb.Empty{})
	sctx, cancel := context.WithTimeout(context.Background(), 2*rpcTimeout)
	defer cancel()
	if err := v.m.Stop(sctx); err != nil {
		t.Fatalf("stop VM: %v", err)
	}

	got, err := exec.Command("debugfs", "-R", "cat /upper/root/new", rw).Output()
	if err != nil || string(got) != "written\n" {
		t.Errorf("the write in the ext4 image: %q, %v; want %q", got, err, "written\n")
	}
	// The deleted lower file is a whiteout (a character device 0/0) in the upper directory.
	got, err = exec.Command("debugfs", "-R", "stat /upper/etc/only-bottom", rw).CombinedOutput()
	if err != nil || !bytes.Contains(got, []byte("character special")) {
		t.Errorf("whiteout of /etc/only-bottom in the ext4 image: %s, %v", got, err)
	}
	for p, sum := range sums {
		if fileSum(t, p) != sum {
			t.Errorf("layer image %s changed", filepath.Base(p))
		}
	}
}

func writeFile(t *testing.T, p, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func mkfs(t *testing.T, tool string, args ...string) {
	t.Helper()
	if out, err := exec.Command(tool, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v: %s", tool, args, err, out)
	}
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}
