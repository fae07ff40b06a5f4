package cri_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/e2e/harness"
)

// TestReadOnlyVolumes mounts a host directory with a tmpfs inside it into a container twice, as a
// read-only volume and as a recursive read-only one (Kubernetes' recursiveReadOnly: Enabled). As with
// runc, a read-only volume is read-only at its top only, and the tmpfs below stays writable; a recursive
// one is read-only all the way down. (On macvm the whole share is one 9p mount in the guest, so the shim
// has to keep the two apart: docs/shim.md.)
func TestReadOnlyVolumes(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt harness.Runtime) {
		// The volume is set up before the daemon, so its cleanup runs after the pod is gone (cleanups run
		// last-in first-out): the host cannot remove a mount point the pod's share still binds.
		src := t.TempDir()
		if err := os.Mkdir(filepath.Join(src, "tmpfs"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("none", filepath.Join(src, "tmpfs"), "tmpfs", 0, ""); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(filepath.Join(src, "tmpfs"), unix.MNT_DETACH) })

		d := daemon(t, rt, harness.CRIConfig{})
		podID, podPath := runPod(t, d, rt, podConfig(d, "volumes"))
		cfg := containerConfig("vols", "sleep", "31341")
		cfg["mounts"] = []map[string]any{
			{"container_path": "/ro", "host_path": src, "readonly": true},
			{"container_path": "/rro", "host_path": src, "readonly": true, "recursive_read_only": true},
		}
		id := startContainer(t, d, podID, podPath, cfg)
		waitState(t, d, id, "CONTAINER_RUNNING")

		for _, c := range []struct {
			path     string
			writable bool
		}{
			{"/ro/top", false},
			{"/ro/tmpfs/file", true},
			{"/rro/top", false},
			{"/rro/tmpfs/file2", false},
		} {
			res, err := d.Crictl(ctx(t, 2*time.Minute), "exec", id, "touch", c.path)
			if err != nil {
				t.Fatal(err)
			}
			if got := res.ExitCode == 0; got != c.writable {
				t.Errorf("touch %s: %v, want writable %v", c.path, res, c.writable)
			}
		}
		if _, err := os.Stat(filepath.Join(src, "tmpfs", "file")); err != nil {
			t.Errorf("the file written below the read-only volume is not on the host: %v", err)
		}
	})
}
