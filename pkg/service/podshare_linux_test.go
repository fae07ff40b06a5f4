package service

import (
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

type fakeInfo struct {
	name string
	mode fs.FileMode
}

func (f fakeInfo) Name() string       { return f.name }
func (f fakeInfo) Size() int64        { return 0 }
func (f fakeInfo) Mode() fs.FileMode  { return f.mode }
func (f fakeInfo) ModTime() time.Time { return time.Time{} }
func (f fakeInfo) IsDir() bool        { return f.mode.IsDir() }
func (f fakeInfo) Sys() any           { return nil }

// TestPodShareAdd checks the layout of a container in the pod share: the
// rootfs and every bind source mounted below <share>/<id>/, the guest spec
// naming them below /run/macvm/shared/<id>/, device binds left alone, hooks
// dropped, and the host spec untouched.
func TestPodShareAdd(t *testing.T) {
	files := map[string]fs.FileMode{
		"/data":          fs.ModeDir,
		"/cfg/hosts":     0,
		"/ro":            fs.ModeDir,
		"/ro-with-tmpfs": fs.ModeDir,
		"/dev/null":      fs.ModeDevice | fs.ModeCharDevice,
		"/snap/1/fs/":    fs.ModeDir,
	}
	mnt := newFakeMounter()
	mnt.submounts = map[string]bool{"/ro-with-tmpfs": true}
	p := newPodShare(filepath.Join(t.TempDir(), "shared"), mnt)
	p.stat = func(path string) (os.FileInfo, error) {
		m, ok := files[path]
		if !ok {
			return nil, fs.ErrNotExist
		}
		return fakeInfo{path, m}, nil
	}
	spec := &specs.Spec{
		Hooks: &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true"}}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/data", Type: "bind", Source: "/data", Options: []string{"rbind", "rw"}},
			{Destination: "/etc/hosts", Type: "bind", Source: "/cfg/hosts", Options: []string{"rbind", "ro"}},
			{Destination: "/mnt/ro", Source: "/ro", Options: []string{"bind", "ro"}},
			{Destination: "/dev/null2", Type: "bind", Source: "/dev/null", Options: []string{"bind"}},
			{Destination: "/mnt/sub", Type: "bind", Source: "/ro-with-tmpfs", Options: []string{"rbind", "ro"}},
			{Destination: "/mnt/rro", Type: "bind", Source: "/ro-with-tmpfs", Options: []string{"rbind", "rro"}},
		},
	}
	gs, err := copySpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	f, err := p.add("c1", containerRootfs{dir: "/snap/1/fs/"}, gs)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(p.dir, "c1")
	for target, want := range map[string]string{
		filepath.Join(dir, "rootfs"): "bind /snap/1/fs/",
		filepath.Join(dir, "0"):      "bind /data",
		filepath.Join(dir, "1"):      "bind /cfg/hosts ro",
		filepath.Join(dir, "2"):      "bind /ro ro",
		filepath.Join(dir, "3"):      "bind /ro-with-tmpfs ro",
		filepath.Join(dir, "4"):      "bind /ro-with-tmpfs rro",
	} {
		if got := mnt.get(target); got != want {
			t.Errorf("host mount on %s: %q, want %q", target, got, want)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, "1")); err != nil || fi.IsDir() {
		t.Errorf("the mount point of a file bind must be a file: %v, %v", fi, err)
	}
	want := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/data", Type: "bind", Source: "/run/macvm/shared/c1/0", Options: []string{"rbind", "rw"}},
		{Destination: "/etc/hosts", Type: "bind", Source: "/run/macvm/shared/c1/1", Options: []string{"rbind", "ro"}},
		{Destination: "/mnt/ro", Source: "/run/macvm/shared/c1/2", Options: []string{"bind", "ro"}},
		{Destination: "/dev/null2", Type: "bind", Source: "/dev/null", Options: []string{"bind"}},
		// Read-only at its top by the host's mount; the mounts below stay writable.
		{Destination: "/mnt/sub", Type: "bind", Source: "/run/macvm/shared/c1/3", Options: []string{"rbind"}},
		// Read-only all the way down, host and guest.
		{Destination: "/mnt/rro", Type: "bind", Source: "/run/macvm/shared/c1/4", Options: []string{"rbind", "ro"}},
	}
	if !reflect.DeepEqual(f.gspec.Mounts, want) {
		t.Errorf("guest mounts:\n got %+v\nwant %+v", f.gspec.Mounts, want)
	}
	if f.gspec.Hooks != nil || spec.Hooks == nil || spec.Mounts[1].Source != "/data" {
		t.Error("hooks must not reach the guest, and the host spec must stay as it was")
	}
	wantRoot := []*agent.Mount{{Type: "bind", Source: "/run/macvm/shared/c1/rootfs", Options: []string{"rbind"}}}
	if !reflect.DeepEqual(f.rootfs, wantRoot) || f.hostDir != dir || f.rootfsMount != "" {
		t.Errorf("rootfs %+v, host dir %q, rootfs mount %q", f.rootfs, f.hostDir, f.rootfsMount)
	}

	// A second container has its own directory; removing it leaves the first.
	if _, err := p.add("c2", containerRootfs{dir: "/snap/1/fs/"}, &specs.Spec{}); err != nil {
		t.Fatal(err)
	}
	if err := p.remove("c2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(p.dir, "c2")); !os.IsNotExist(err) || mnt.get(filepath.Join(dir, "rootfs")) == "" {
		t.Errorf("remove c2: its dir %v, c1's rootfs %q", err, mnt.get(filepath.Join(dir, "rootfs")))
	}
	if err := p.removeAll(); err != nil || mnt.count() != 0 {
		t.Errorf("removeAll: %v, %d mounts left", err, mnt.count())
	}

	for name, bad := range map[string]specs.Mount{
		"relative source": {Destination: "/x", Type: "bind", Source: "data"},
		"missing source":  {Destination: "/x", Type: "bind", Source: "/nope"},
	} {
		if _, err := p.add("bad", containerRootfs{dir: "/snap/1/fs/"}, &specs.Spec{Mounts: []specs.Mount{bad}}); err == nil {
			t.Errorf("%s: want an error", name)
		}
		if _, err := os.Stat(filepath.Join(p.dir, "bad")); !os.IsNotExist(err) {
			t.Errorf("%s: the failed container's dir is left: %v", name, err)
		}
	}
	if _, err := p.add("../x", containerRootfs{dir: "/snap/1/fs/"}, &specs.Spec{}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("an ID that is not a path component: %v, want ErrInvalidArgument", err)
	}
}

// TestSysMounter mounts for real (it needs root, as the shim does): a
// read-only bind of a file and a directory, then unmountAll leaves nothing.
func TestSysMounter(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("bind mounts need root")
	}
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dst := filepath.Join(dir, "d")
	fdst := filepath.Join(dir, "f")
	os.Mkdir(dst, 0o755)
	os.WriteFile(fdst, nil, 0o644)
	var m sysMounter
	if sub, err := m.bind(src, dst, readOnlyTop); err != nil || sub {
		t.Fatalf("bind of a directory without mounts below it: submounts %v, %v; want false, nil", sub, err)
	}
	if _, err := m.bind(filepath.Join(src, "f"), fdst, writable); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(fdst); err != nil || string(b) != "x" {
		t.Errorf("file bind: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(dst, "new"), nil, 0o644); err == nil {
		t.Error("a write through a read-only bind succeeded")
	}
	if err := m.unmountAll(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dst, "f")); !os.IsNotExist(err) {
		t.Errorf("still mounted after unmountAll: %v", err)
	}
}

// treeWithTmpfs makes a source tree with a tmpfs mounted at src/tmpfs (unmounted at the end) and an
// empty bind target dst in dir, for the bind tests below. It skips without root.
func treeWithTmpfs(t *testing.T) (src, dir, dst string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("bind mounts need root")
	}
	src = t.TempDir()
	sub := filepath.Join(src, "tmpfs")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("none", sub, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(sub, unix.MNT_DETACH) })
	dir = t.TempDir()
	dst = filepath.Join(dir, "d")
	if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	return src, dir, dst
}

// TestSysMounterSubmounts binds a tree with a tmpfs mounted inside it read-only, as critest's
// non-recursive readonly mount spec does: the top is read-only, the tmpfs below stays writable, and bind
// reports the submount (so the guest does not make the whole tree read-only).
func TestSysMounterSubmounts(t *testing.T) {
	src, dir, dst := treeWithTmpfs(t)
	var m sysMounter
	submounts, err := m.bind(src, dst, readOnlyTop)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.unmountAll(dir) })
	if !submounts {
		t.Error("bind of a tree with a tmpfs inside: submounts false, want true")
	}
	if err := os.WriteFile(filepath.Join(dst, "top"), nil, 0o644); err == nil {
		t.Error("a write to the read-only bind's top succeeded")
	}
	if err := os.WriteFile(filepath.Join(dst, "tmpfs", "file"), nil, 0o644); err != nil {
		t.Errorf("a write to the tmpfs below a non-recursive read-only bind: %v, want it writable", err)
	}
	if err := m.unmountAll(dir); err != nil {
		t.Fatal(err)
	}
}

// TestSysMounterRecursiveReadOnly binds a tree with a tmpfs inside it with "rro": the tmpfs is
// read-only too.
func TestSysMounterRecursiveReadOnly(t *testing.T) {
	src, dir, dst := treeWithTmpfs(t)
	var m sysMounter
	if _, err := m.bind(src, dst, readOnlyAll); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.unmountAll(dir) })
	for _, f := range []string{filepath.Join(dst, "top"), filepath.Join(dst, "tmpfs", "file")} {
		if err := os.WriteFile(f, nil, 0o644); err == nil {
			t.Errorf("a write to %s through a recursive read-only bind succeeded", f)
		}
	}
	if err := os.WriteFile(filepath.Join(src, "tmpfs", "file"), nil, 0o644); err != nil {
		t.Errorf("the source's own tmpfs became read-only: %v", err)
	}
	if err := m.unmountAll(dir); err != nil {
		t.Fatal(err)
	}
}
