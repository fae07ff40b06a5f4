package container

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/reaper"
)

// TestHostSpareHelper runs a container from a spare helper on the build
// machine (root, no VM): the spare started before the container's root was
// mounted still sees it (through a shared mount, as /run is in the guest),
// gets its stdio and cgroup late, and runs the program as the container's
// PID 1 under the spec's hostname. The next container, with no spare left,
// starts a helper afresh.
func TestHostSpareHelper(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("creating namespaces, mounts and cgroups needs root; the VM tests cover this as PID 1")
	}
	cgRoot := hostCgroupRoot(t)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	r := reaper.New()
	stop := make(chan struct{})
	defer close(stop)
	go r.Run(stop)
	base := t.TempDir()
	if err := unix.Mount("tmpfs", base, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(base, unix.MNT_DETACH)
	if err := unix.Mount("", base, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	streams := &pipeStreams{conns: map[string]net.Conn{}}
	parent := fmt.Sprintf("macvm-test-spare-%d", os.Getpid())
	m := NewManager(Config{RunDir: filepath.Join(base, "c"), CgroupRoot: cgRoot, CgroupParent: parent}, r, streams, nil)
	defer os.Remove(filepath.Join(cgRoot, parent))
	rootfs := hostRootfs(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	m.StartSpareAsync(t.Logf)
	for !m.SpareSettled() {
		if ctx.Err() != nil {
			t.Fatal("the spare helper never became idle")
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.mu.Lock()
	sparePid := m.spare.pid
	m.mu.Unlock()

	run := func(id string, noSpare bool) (pid int) {
		t.Helper()
		_, out, outDone := streams.open(id + "-out")
		_, errb, errDone := streams.open(id + "-err")
		b, _ := json.Marshal(hostSpec("sh", "-c", "echo out $$ $(hostname) $(cat /proc/self/cgroup); echo err >&2; exit 3"))
		c, err := m.Create(ctx, id, b, nil, []Mount{{Type: "bind", Source: rootfs, Options: []string{"rbind"}}}, Stdio{Stdout: id + "-out", Stderr: id + "-err"}, noSpare)
		if err != nil {
			t.Fatalf("Create %s: %v", id, err)
		}
		if err := c.Init().Start(); err != nil {
			t.Fatalf("Start %s: %v", id, err)
		}
		status, _, err := c.Init().Wait(ctx)
		<-outDone
		<-errDone
		// The cgroup namespace is not asked for: the path is the host's
		// (cgroup v1 lines before it on a hybrid host).
		cg := fmt.Sprintf(" 0::/%s/%s\n", parent, id)
		if err != nil || status != 3 || !strings.HasPrefix(out.String(), "out 1 hosttest ") || !strings.HasSuffix(out.String(), cg) || errb.String() != "err\n" {
			t.Fatalf("%s: status %d (%v), stdout %q, stderr %q; want 3, \"out 1 hosttest ...%s\", %q", id, status, err, out.String(), errb.String(), cg, "err\n")
		}
		pid = c.Init().Pid()
		if err := m.Delete(ctx, id); err != nil {
			t.Fatalf("Delete %s: %v", id, err)
		}
		return pid
	}
	// A create that asks for no spare (the pool's warm-up container)
	// leaves it to the next one.
	if pid := run("no-spare", true); pid == sparePid {
		t.Error("a create with noSpare took the spare")
	}
	m.mu.Lock()
	kept := m.spare
	m.mu.Unlock()
	if kept == nil || kept.pid != sparePid {
		t.Fatal("the spare is gone after a create with noSpare")
	}
	if pid := run("spare", false); pid != sparePid {
		t.Errorf("the first container's init is pid %d, not the spare's %d", pid, sparePid)
	}
	if !m.SpareSettled() || m.takeSpare(ctx, spareCloneflags, nil) != nil {
		t.Error("the spare is still there after a container took it")
	}
	if pid := run("fresh", false); pid == sparePid {
		t.Error("the second container reused the spare's pid")
	}

	// A spare that died while idle is not used: the container starts
	// from a fresh helper.
	if err := m.StartSpare(); err != nil {
		t.Fatal(err)
	}
	for !m.SpareSettled() {
		if ctx.Err() != nil {
			t.Fatal("the second spare never became idle")
		}
		time.Sleep(10 * time.Millisecond)
	}
	m.mu.Lock()
	dead := m.spare
	m.mu.Unlock()
	dead.proc.Signal(unix.SIGKILL)
	select {
	case <-dead.exitc: // closed after its value: takeSpare still sees it
	case <-ctx.Done():
		t.Fatal("the killed spare was never reaped")
	}
	if pid := run("after-dead-spare", false); pid == dead.pid {
		t.Error("a container ran from a dead spare's pid")
	}

	// A first container that wants other namespaces discards the spare.
	if err := m.StartSpare(); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	sp := m.spare
	m.mu.Unlock()
	if got := m.takeSpare(ctx, unix.CLONE_NEWNS, nil); got != nil {
		t.Fatal("a container without new PID, IPC and UTS namespaces got the spare")
	}
	select {
	case <-sp.exitc:
	case <-ctx.Done():
		t.Fatal("the unused spare was not killed")
	}
	if !m.SpareSettled() {
		t.Error("the manager still counts a spare")
	}
}
