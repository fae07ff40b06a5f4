package container

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/reaper"
)

// TestMain lets the test binary serve as the helper: spawn re-executes
// /proc/self/exe under HelperArg0, exactly as the agent binary does.
func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == HelperArg0 {
		RunHelper()
	}
	os.Exit(m.Run())
}

// hostCgroupRoot is a cgroup v2 mount usable on the build machine (which
// runs a hybrid hierarchy) or in a guest.
func hostCgroupRoot(t *testing.T) string {
	for _, p := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		if _, err := os.Stat(filepath.Join(p, "cgroup.subtree_control")); err == nil {
			return p
		}
	}
	t.Skip("this machine has no cgroup v2 hierarchy; the VM tests (e2e/guest) cover containers there")
	return ""
}

// pipeStreams is a Streams whose named streams are in-memory pipes; the test
// holds the other ends.
type pipeStreams struct {
	mu    sync.Mutex // guards conns
	conns map[string]net.Conn
}

func (s *pipeStreams) Wait(ctx context.Context, name string) (net.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.conns[name]
	if !ok {
		return nil, fmt.Errorf("no stream %q", name)
	}
	delete(s.conns, name)
	return c, nil
}

// open makes a stream called name and returns the host's end, whose output
// is collected in the background.
func (s *pipeStreams) open(name string) (net.Conn, *bytes.Buffer, chan struct{}) {
	agentEnd, hostEnd := net.Pipe()
	s.mu.Lock()
	s.conns[name] = halfCloser{agentEnd}
	s.mu.Unlock()
	var buf bytes.Buffer
	done := make(chan struct{})
	go func() {
		io.Copy(&buf, hostEnd)
		close(done)
	}()
	return hostEnd, &buf, done
}

// halfCloser turns CloseWrite into Close for net.Pipe, which has no
// half-close: the host end then reads EOF.
type halfCloser struct{ net.Conn }

func (h halfCloser) CloseWrite() error { return h.Conn.Close() }

func hostRootfs(t *testing.T) string {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	for _, d := range []string{"proc", "dev", "tmp"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("needs a static busybox at /bin/busybox (Debian busybox-static): %v", err)
	}
	os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755)
	for _, a := range []string{"sh", "echo", "cat", "sleep", "hostname", "tr", "tty", "stty", "seq"} {
		os.Link(filepath.Join(root, "bin", "busybox"), filepath.Join(root, "bin", a))
	}
	return root
}

func hostSpec(args ...string) *specs.Spec {
	return &specs.Spec{
		Hostname: "hosttest",
		Process:  &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"newinstance", "ptmxmode=0666"}},
		},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}, {Type: specs.UTSNamespace}, {Type: specs.IPCNamespace},
		}},
	}
}

// TestHostContainerLifecycle runs real containers on the build machine
// (root, no VM): the helper, pivot_root, namespaces, stdio, exec, delete.
func TestHostContainerLifecycle(t *testing.T) {
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
	streams := &pipeStreams{conns: map[string]net.Conn{}}
	runDir := filepath.Join(t.TempDir(), "c")
	parent := fmt.Sprintf("macvm-test-%d", os.Getpid())
	m := NewManager(Config{RunDir: runDir, CgroupRoot: cgRoot, CgroupParent: parent}, r, streams, nil)
	defer os.Remove(filepath.Join(cgRoot, parent))
	rootfs := hostRootfs(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	create := func(id string, spec *specs.Spec) (*Container, *bytes.Buffer, *bytes.Buffer, chan struct{}, chan struct{}) {
		t.Helper()
		_, out, outDone := streams.open(id + "-out")
		_, errb, errDone := streams.open(id + "-err")
		b, _ := json.Marshal(spec)
		c, err := m.Create(ctx, id, b, nil, []Mount{{Type: "bind", Source: rootfs, Options: []string{"rbind"}}}, Stdio{Stdout: id + "-out", Stderr: id + "-err"}, false)
		if err != nil {
			t.Fatalf("Create %s: %v", id, err)
		}
		return c, out, errb, outDone, errDone
	}

	c, out, errb, outDone, errDone := create("one", hostSpec("sh", "-c", "echo out $$ $(hostname); echo err >&2; exit 3"))
	if err := c.Init().Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	status, _, err := c.Init().Wait(ctx)
	<-outDone
	<-errDone
	if err != nil || status != 3 || out.String() != "out 1 hosttest\n" || errb.String() != "err\n" {
		t.Fatalf("init: status %d (%v), stdout %q, stderr %q; want 3, %q, %q", status, err, out.String(), errb.String(), "out 1 hosttest\n", "err\n")
	}
	if err := m.Delete(ctx, "one"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cgRoot, parent, "one")); !os.IsNotExist(err) {
		t.Errorf("cgroup left behind: %v", err)
	}
	if _, err := os.Stat(filepath.Join(runDir, "one")); !os.IsNotExist(err) {
		t.Errorf("container dir left behind: %v", err)
	}

	c, _, _, _, _ = create("two", hostSpec("sleep", "100"))
	if err := c.Init().Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	_, eout, eoutDone := streams.open("x-out")
	proc, _ := json.Marshal(&specs.Process{Args: []string{"sh", "-c", "tr '\\0' ' ' </proc/1/cmdline; hostname"}, Cwd: "/", Env: []string{"PATH=/bin"}})
	e, err := c.Exec(ctx, "x", proc, Stdio{Stdout: "x-out"})
	if err != nil {
		t.Fatalf("Exec: %v", err)
	}
	if err := e.Start(); err != nil {
		t.Fatalf("exec Start: %v", err)
	}
	if st, _, _ := e.Wait(ctx); st != 0 {
		t.Fatalf("exec status %d", st)
	}
	<-eoutDone
	if eout.String() != "sleep 100 hosttest\n" {
		t.Fatalf("exec stdout %q, want the init's cmdline and hostname", eout.String())
	}
	// A terminal asked for only on the stdio, as containerd's client does
	// for an exec (the spec is the container's non-tty one): the process
	// still gets a pty, sized before it starts, and all its output.
	_, tout, toutDone := streams.open("t-out")
	ttyProc, _ := json.Marshal(&specs.Process{Args: []string{"sh", "-c", "tty; stty size; seq 1 100000"}, Cwd: "/", Env: []string{"PATH=/bin"}})
	te, err := c.Exec(ctx, "t", ttyProc, Stdio{Stdout: "t-out", Terminal: true})
	if err != nil {
		t.Fatalf("Exec with a terminal: %v", err)
	}
	if err := te.Resize(132, 43); err != nil {
		t.Fatalf("Resize before start: %v", err)
	}
	if err := te.Start(); err != nil {
		t.Fatalf("tty exec Start: %v", err)
	}
	if st, _, _ := te.Wait(ctx); st != 0 {
		t.Fatalf("tty exec status %d", st)
	}
	<-toutDone
	checkTTYOutput(t, tout.String(), "43 132", 100000)

	// The other way round: the spec asks for a terminal, the stdio has a
	// stderr stream too. Everything goes through the pty on stdout and the
	// stderr stream ends (EOF) instead of staying open.
	_, sout, soutDone := streams.open("s-out")
	_, serr, serrDone := streams.open("s-err")
	specTTY, _ := json.Marshal(&specs.Process{Terminal: true, Args: []string{"sh", "-c", "tty; stty size; seq 1 1000; echo err >&2"}, Cwd: "/", Env: []string{"PATH=/bin"},
		ConsoleSize: &specs.Box{Height: 25, Width: 90}})
	se, err := c.Exec(ctx, "s", specTTY, Stdio{Stdout: "s-out", Stderr: "s-err"})
	if err != nil {
		t.Fatalf("Exec with a terminal in the spec: %v", err)
	}
	if err := se.Start(); err != nil {
		t.Fatalf("spec tty exec Start: %v", err)
	}
	if st, _, _ := se.Wait(ctx); st != 0 {
		t.Fatalf("spec tty exec status %d", st)
	}
	<-soutDone
	select {
	case <-serrDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the stderr stream of a process with a terminal is still open after its exit")
	}
	checkTTYOutput(t, strings.TrimSuffix(sout.String(), "err\r\n"), "25 90", 1000)
	if !strings.HasSuffix(sout.String(), "\r\nerr\r\n") || serr.Len() != 0 {
		t.Fatalf("spec tty exec: stdout ends %q, stderr %q; want the pty to carry stderr too", sout.String()[max(0, sout.Len()-20):], serr.String())
	}

	missing, _ := json.Marshal(&specs.Process{Args: []string{"nope"}, Cwd: "/", Env: []string{"PATH=/bin"}})
	bad, err := c.Exec(ctx, "bad", missing, Stdio{})
	if err != nil {
		t.Fatalf("Exec: %v", err)
	}
	if err := bad.Start(); err == nil || !strings.Contains(err.Error(), `exec: "nope": executable file not found in $PATH`) {
		t.Fatalf("starting a missing program: %v", err)
	}
	if err := c.Signal("", unix.SIGKILL, true); err != nil {
		t.Fatal(err)
	}
	if st, _, _ := c.Init().Wait(ctx); st != 137 {
		t.Fatalf("init status after kill all: %d, want 137", st)
	}
	if err := m.Delete(ctx, "two"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := m.Delete(ctx, "two"); err == nil {
		t.Fatal("second Delete succeeded")
	}
	_ = exec.ErrNotFound
}

// checkTTYOutput checks what `tty; stty size; seq 1 n` printed through a
// pty: the slave's name, the window size, then every number in order.
func checkTTYOutput(t *testing.T, out, size string, n int) {
	t.Helper()
	lines := strings.Split(strings.ReplaceAll(out, "\r\n", "\n"), "\n")
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "/dev/pts/") || lines[1] != size {
		t.Fatalf("tty output starts %q, want /dev/pts/N then %q", lines[:min(len(lines), 3)], size)
	}
	nums := lines[2:]
	if len(nums) > 0 && nums[len(nums)-1] == "" {
		nums = nums[:len(nums)-1]
	}
	if len(nums) != n {
		t.Fatalf("tty output has %d numbers, want %d (ends %q)", len(nums), n, out[max(0, len(out)-40):])
	}
	for i, l := range nums {
		if l != strconv.Itoa(i+1) {
			t.Fatalf("tty output line %d is %q, want %d", i+3, l, i+1)
		}
	}
}

// TestHostPreparedCgroups: PrepareCgroups makes the containers' parent with
// the controllers delegated, after which a container's cgroup is only
// made (no subtree_control writes) and still gets every controller, and
// goes with the container.
func TestHostPreparedCgroups(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("creating cgroups needs root; the VM tests cover this as PID 1")
	}
	cgRoot := hostCgroupRoot(t)
	parent := fmt.Sprintf("macvm-test-prep-%d", os.Getpid())
	m := NewManager(Config{RunDir: t.TempDir(), CgroupRoot: cgRoot, CgroupParent: parent}, nil, nil, nil)
	defer os.Remove(filepath.Join(cgRoot, parent))
	if err := m.PrepareCgroups(); err != nil {
		t.Fatalf("PrepareCgroups: %v", err)
	}
	read := func(p string) []string {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Fields(string(b))
	}
	avail := read(filepath.Join(cgRoot, "cgroup.controllers"))
	want := strings.Join(delegatedControllers(avail), " ")
	if got := strings.Join(read(filepath.Join(cgRoot, parent, "cgroup.subtree_control")), " "); got != want {
		t.Errorf("parent's subtree_control %q, want %q", got, want)
	}
	c := &Container{ID: "prepared", m: m, cgFD: -1}
	spec := &specs.Spec{}
	if strings.Contains(want, "pids") { // not on a hybrid build machine
		limit := int64(42)
		spec.Linux = &specs.Linux{Resources: &specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &limit}}}
	}
	if err := c.createCgroup(spec); err != nil {
		t.Fatalf("createCgroup: %v", err)
	}
	if got := strings.Join(read(filepath.Join(c.cgPath, "cgroup.controllers")), " "); got != want {
		t.Errorf("container cgroup's controllers %q, want %q", got, want)
	}
	if strings.Contains(want, "pids") {
		if got := strings.Join(read(filepath.Join(c.cgPath, "pids.max")), ""); got != "42" {
			t.Errorf("pids.max %q, want 42", got)
		}
	}
	c.teardown()
	if _, err := os.Stat(c.cgPath); !os.IsNotExist(err) {
		t.Errorf("cgroup left behind: %v", err)
	}
}
