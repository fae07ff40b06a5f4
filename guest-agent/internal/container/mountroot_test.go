package container

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// inPrivateMountNS runs f on a thread of its own in a new, private mount
// namespace: the mounts it makes never reach the machine's namespace, and
// the thread ends with f (it stays locked), taking the namespace along.
func inPrivateMountNS(t *testing.T, f func() error) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("mounting needs root; the VM tests (e2e/guest, e2e/containerd) cover the helper's mounts as PID 1")
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS); err != nil {
			errc <- err
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestMountInRootStaysInside mounts the spec's mounts through symlinks of
// the image that point out of the container's root, by absolute and by
// relative targets, dangling or not: every mount lands inside the root.
func TestMountInRootStaysInside(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "rootfs")
	outside := filepath.Join(base, "outside")
	for _, d := range []string{"rootfs/proc", "rootfs/real", "outside/target", "outside/dangling"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	src := filepath.Join(base, "src")
	if err := os.WriteFile(src, []byte("bound"), 0o644); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"abs":      outside + "/target",    // exists outside: resolves to root/<outside>/target
		"rel":      "../../outside/target", // ".." stops at the root
		"dangling": "/nowhere/dir",         // created inside the root
		"file":     "../../outside/file",   // a file bind through a relative link
		"ok":       "real",
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	tmpfs := func(dest string) specs.Mount {
		return specs.Mount{Destination: dest, Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "size=64k"}}
	}
	mounts := []specs.Mount{
		tmpfs("/proc"),
		tmpfs("/abs"),
		tmpfs("/rel/sub"),
		tmpfs("/dangling"),
		tmpfs("/ok/new/deeper"),
		tmpfs("/run"),     // missing: made in its parent
		tmpfs("/ok/made"), // the same, the parent through a symlink
		{Destination: "/hostname", Type: "bind", Source: src, Options: []string{"bind"}},
		{Destination: "/file", Type: "bind", Source: src, Options: []string{"rbind", "ro"}},
		{Destination: "/ok/rw", Type: "bind", Source: base + "/outside/target", Options: []string{"bind", "rslave"}},
	}
	inPrivateMountNS(t, func() error {
		if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return err
		}
		rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(rootFD)
		for _, m := range mounts {
			if err := mountInRoot(rootFD, root, m); err != nil {
				t.Errorf("mountInRoot(%s): %v", m.Destination, err)
			}
		}
		isTmpfs := func(p string) bool {
			var st unix.Statfs_t
			return unix.Statfs(p, &st) == nil && st.Type == unix.TMPFS_MAGIC
		}
		for _, p := range []string{"proc", outside[1:] + "/target", "outside/target/sub", "nowhere/dir", "real/new/deeper", "run", "real/made"} {
			if !isTmpfs(filepath.Join(root, p)) {
				t.Errorf("no tmpfs at %s inside the root", p)
			}
		}
		// Nothing reached the real directories outside the root.
		for _, p := range []string{outside + "/target", outside + "/target/sub", "/nowhere/dir"} {
			if isTmpfs(p) {
				t.Errorf("a mount escaped the root to %s", p)
			}
		}
		if _, err := os.Stat(outside + "/file"); !os.IsNotExist(err) {
			t.Errorf("the file bind created %s outside the root (%v)", outside+"/file", err)
		}
		if b, err := os.ReadFile(filepath.Join(root, "outside/file")); err != nil || string(b) != "bound" {
			t.Errorf("file bind inside the root: %q, %v", b, err)
		}
		// "ro" reached the bind mount by the remount.
		var st unix.Statfs_t
		if err := unix.Statfs(filepath.Join(root, "outside/file"), &st); err != nil || st.Flags&unix.ST_RDONLY == 0 {
			t.Errorf("file bind is not read-only: flags %#x, %v", st.Flags, err)
		}
		if b, err := os.ReadFile(filepath.Join(root, "hostname")); err != nil || string(b) != "bound" {
			t.Errorf("file bind on a new file: %q, %v", b, err)
		}
		if _, err := os.Stat(filepath.Join(root, "real/rw")); err != nil {
			t.Errorf("bind through a symlink inside the root: %v", err)
		}
		return nil
	})
}

// TestMountInRootErrors: a mount point that is a file, or a loop of
// symlinks, fails the mount with an error that names the destination.
func TestMountInRootErrors(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "afile"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("loop", filepath.Join(root, "loop")); err != nil {
		t.Fatal(err)
	}
	inPrivateMountNS(t, func() error {
		rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(rootFD)
		for _, dest := range []string{"/afile", "/loop/x"} {
			err := mountInRoot(rootFD, root, specs.Mount{Destination: dest, Type: "tmpfs", Source: "tmpfs"})
			if err == nil {
				t.Errorf("mountInRoot(%s) succeeded", dest)
				continue
			}
			if !strings.Contains(err.Error(), dest) {
				t.Errorf("mountInRoot(%s) = %q: does not name the destination", dest, err)
			}
		}
		return nil
	})
}
