package containerd_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// TestReuseID creates containers with the ID of one just deleted: the new
// container's shim socket has the old one's path, and the old shim may still
// be tearing its VM down when containerd starts the new one. The new
// container must get a shim of its own (not the dying one, which would
// answer its Create with "ttrpc: closed"), and the old shim's exit must not
// take the new shim's socket with it.
func TestReuseID(t *testing.T) {
	forEachRuntime(t, false, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt)
		// `ctr run --rm` back to back: each deletes its task (the shim's
		// Shutdown, its VM torn down in the background) and the next
		// starts at once with the same ID.
		for i := range 6 {
			res := run(t, d, rt, nil, nil, "reuse", "sh", "-c", fmt.Sprintf("echo run %d; exit %d", i, i))
			if res.ExitCode != i || string(res.Stdout) != fmt.Sprintf("run %d\n", i) {
				t.Fatalf("ctr run --rm #%d: %v\nwant exit %d and output %q", i, res, i, fmt.Sprintf("run %d\n", i))
			}
		}
		// A detached container deleted and re-created at once; the new
		// one's shim must still serve it afterwards (its socket was not
		// unlinked by the old shim's exit): exec, kill and delete go
		// through it.
		const id = "reuse-d"
		for i := range 3 {
			runDetached(t, d, rt, nil, id, "sleep", "600")
			waitStatus(t, d, id, "RUNNING", time.Minute)
			// Let the previous shim (if any) finish exiting, so a socket it
			// wrongly removed on its way out is gone before the exec.
			time.Sleep(2 * time.Second)
			socket := ""
			if rt.VM {
				// macvm's start action records its socket in the bundle.
				addr, err := os.ReadFile(filepath.Join(d.BundleDir(id), "address"))
				if err != nil {
					t.Fatal(err)
				}
				socket = strings.TrimPrefix(string(addr), "unix://")
				if _, err := os.Stat(socket); err != nil {
					t.Fatalf("re-created container #%d: its shim's socket: %v", i, err)
				}
			}
			res := ctrOK(t, d, "task", "exec", "--exec-id", fmt.Sprintf("e%d", i), id, "echo", fmt.Sprintf("cycle %d", i))
			if strings.TrimSpace(string(res.Stdout)) != fmt.Sprintf("cycle %d", i) {
				t.Fatalf("exec in re-created container #%d: %v", i, res)
			}
			ctrOK(t, d, "task", "kill", "-s", "SIGKILL", id)
			waitStatus(t, d, id, "STOPPED", time.Minute)
			ctrOK(t, d, "task", "delete", id)
			// containerd's task delete returns after the shim's Shutdown:
			// by then the socket must be gone, though the shim may still
			// be tearing its VM down, so the next start makes a new shim.
			if socket != "" {
				if _, err := os.Lstat(socket); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("container #%d: its shim's socket after task delete: %v, want it removed", i, err)
				}
			}
			ctrOK(t, d, "container", "delete", id)
		}
	})
}
