package service

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// harness is a Service wired to fake VMs and a fake agent.
type harness struct {
	t     *testing.T
	ctx   context.Context
	svc   *Service
	rec   *recorder
	agent *fakeAgent
	mnt   *fakeMounter
	sd    shutdown.Service
	opts  *anypb.Any
	dir   string

	// mu guards machines.
	mu       sync.Mutex
	machines []*fakeMachine
}

func newHarness(t *testing.T, run func(p *fakeProc)) *harness {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{"vmlinux", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	body := fmt.Sprintf("kernel = %q\ninitrd = %q\n", filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd.img"))
	opts, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigBody: []byte(body)})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, rec: &recorder{}, agent: newFakeAgent(run), mnt: newFakeMounter(), opts: opts, dir: dir}
	ctx := namespaces.WithNamespace(context.Background(), "test")
	ctx, h.sd = shutdown.WithShutdown(ctx)
	h.ctx = ctx
	b := backend{
		newMachine: func(cfg vm.Config) (vm.Machine, error) {
			m := &fakeMachine{cfg: cfg, done: make(chan struct{})}
			h.mu.Lock()
			h.machines = append(h.machines, m)
			h.mu.Unlock()
			return m, nil
		},
		lookupHypervisor: func(string) (string, string, error) { return "/fake/qemu", "", nil },
		dialAgent:        func(context.Context, net.Conn, bool) (agentClient, error) { return h.agent, nil },
		mounter:          h.mnt,
	}
	h.svc, err = newService(ctx, h.rec, h.sd, b)
	if err != nil {
		t.Fatal(err)
	}
	h.svc.stateBase = filepath.Join(dir, "run")
	t.Cleanup(func() {
		h.sd.Shutdown()
		<-h.sd.Done()
	})
	return h
}

func (h *harness) machine(i int) *fakeMachine {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.machines[i]
}

// bundle writes a bundle with an OCI spec and returns its path.
func (h *harness) bundle(id string, mutate func(*specs.Spec)) string {
	h.t.Helper()
	b := filepath.Join(h.dir, id)
	if err := os.MkdirAll(filepath.Join(b, "rootfs"), 0o755); err != nil {
		h.t.Fatal(err)
	}
	spec := &specs.Spec{
		Version: specs.Version,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: []string{"/bin/true"}, Cwd: "/"},
		Linux:   &specs.Linux{},
	}
	if mutate != nil {
		mutate(spec)
	}
	data, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(b, "config.json"), data, 0o644); err != nil {
		h.t.Fatal(err)
	}
	return b
}

func (h *harness) fifo(name string) string {
	h.t.Helper()
	p := filepath.Join(h.dir, name)
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		h.t.Fatal(err)
	}
	return p
}

// readAll reads a FIFO to EOF in the background, as a client does. Like
// containerd's client it holds the read end open before the task is created,
// so output written (and the FIFO closed) before the goroutine runs is not
// lost; poll reports a hang-up only after a writer has come and gone.
func readAll(path string) <-chan string {
	ch := make(chan string, 1)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		ch <- "open: " + err.Error()
		return ch
	}
	go func() {
		defer unix.Close(fd)
		var out []byte
		buf := make([]byte, 64<<10)
		for {
			if _, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, -1); err != nil && err != unix.EINTR {
				ch <- "poll: " + err.Error()
				return
			}
			n, err := unix.Read(fd, buf)
			switch {
			case n > 0:
				out = append(out, buf[:n]...)
			case err == nil: // hang-up after a writer: EOF
				ch <- string(out)
				return
			case err != unix.EAGAIN && err != unix.EINTR:
				ch <- "read: " + err.Error()
				return
			}
		}
	}()
	return ch
}

func (h *harness) create(id string, r *taskAPI.CreateTaskRequest) {
	h.t.Helper()
	if r == nil {
		r = &taskAPI.CreateTaskRequest{}
	}
	r.ID = id
	if r.Bundle == "" {
		r.Bundle = h.bundle(id, nil)
	}
	r.Options = h.opts
	if _, err := h.svc.Create(h.ctx, r); err != nil {
		h.t.Fatalf("create %s: %v", id, err)
	}
}

func (h *harness) start(id, execID string) {
	h.t.Helper()
	if _, err := h.svc.Start(h.ctx, &taskAPI.StartRequest{ID: id, ExecID: execID}); err != nil {
		h.t.Fatalf("start %s/%s: %v", id, execID, err)
	}
}

func (h *harness) wait(id, execID string) uint32 {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(h.ctx, 20*time.Second)
	defer cancel()
	r, err := h.svc.Wait(ctx, &taskAPI.WaitRequest{ID: id, ExecID: execID})
	if err != nil {
		h.t.Fatalf("wait %s/%s: %v", id, execID, err)
	}
	return r.ExitStatus
}

func (h *harness) exec(id, execID string, r *taskAPI.ExecProcessRequest) error {
	if r == nil {
		r = &taskAPI.ExecProcessRequest{}
	}
	r.ID, r.ExecID = id, execID
	data, _ := json.Marshal(&specs.Process{Args: []string{"/bin/sh"}, Cwd: "/"})
	r.Spec = &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: data}
	_, err := h.svc.Exec(h.ctx, r)
	return errgrpc.ToNative(err)
}

// describe renders an event for order assertions: "exit e1 137".
func describe(e any) string {
	switch e := e.(type) {
	case *eventstypes.TaskCreate:
		return "create " + e.ContainerID
	case *eventstypes.TaskStart:
		return "start " + e.ContainerID
	case *eventstypes.TaskExecAdded:
		return "exec-added " + e.ExecID
	case *eventstypes.TaskExecStarted:
		return "exec-started " + e.ExecID
	case *eventstypes.TaskExit:
		return fmt.Sprintf("exit %s %d", e.ID, e.ExitStatus)
	case *eventstypes.TaskDelete:
		return "delete " + e.ContainerID
	case *eventstypes.TaskOOM:
		return "oom " + e.ContainerID
	case *eventstypes.TaskPaused:
		return "paused " + e.ContainerID
	case *eventstypes.TaskResumed:
		return "resumed " + e.ContainerID
	}
	return fmt.Sprintf("%T", e)
}

// events waits until n events were published and returns them described.
func (h *harness) events(n int) []string {
	h.t.Helper()
	h.rec.waitFor(h.t, n)
	_, evts := h.rec.snapshot()
	var out []string
	for _, e := range evts {
		out = append(out, describe(e))
	}
	return out
}

func wantEvents(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Errorf("events:\n got %s\nwant %s", strings.Join(got, "; "), strings.Join(want, "; "))
	}
}

// TestTaskLifecycle drives one container through create, start, exit and
// delete, checking output delivery, states, stats after exit, the events
// and the refusals containerd relies on.
func TestTaskLifecycle(t *testing.T) {
	h := newHarness(t, func(p *fakeProc) {
		io.WriteString(p.stdout, "hello\n")
		io.WriteString(p.stderr, "oops\n")
		p.exitWith(3)
	})
	stdout, stderr := h.fifo("out"), h.fifo("err")
	outC, errC := readAll(stdout), readAll(stderr)
	h.create("c1", &taskAPI.CreateTaskRequest{Stdout: stdout, Stderr: stderr})

	st, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "c1"})
	if err != nil || st.Status != task.Status_CREATED || st.Pid != 101 {
		t.Fatalf("state after create: %v, %v", st, err)
	}
	shared := filepath.Join(vmStateDir(h.svc.stateBase, "test", "c1", filepath.Join(h.dir, "c1")), "shared")
	if cfg := h.machine(0).cfg; len(cfg.Shares) != 1 || cfg.Shares[0].Tag != podShareTag || cfg.Shares[0].HostPath != shared ||
		cfg.MemoryMiB != defaultMemoryMiB || cfg.Hypervisor != "/fake/qemu" {
		t.Errorf("VM config: %+v", cfg)
	}
	if got, want := h.mnt.get(filepath.Join(shared, "c1", "rootfs")), "bind "+filepath.Join(h.dir, "c1", "rootfs"); got != want {
		t.Errorf("rootfs host mount: %q, want %q", got, want)
	}
	h.start("c1", "")
	if got := h.wait("c1", ""); got != 3 {
		t.Errorf("exit status %d, want 3", got)
	}
	// Wait answered: the output is already in the FIFOs, and they are
	// closed, so the readers see EOF.
	for name, ch := range map[string]<-chan string{"stdout": outC, "stderr": errC} {
		select {
		case got := <-ch:
			want := map[string]string{"stdout": "hello\n", "stderr": "oops\n"}[name]
			if got != want {
				t.Errorf("%s: got %q, want %q", name, got, want)
			}
		case <-time.After(5 * time.Second):
			t.Errorf("%s: no EOF after the exit: the FIFO was left open", name)
		}
	}
	st, _ = h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "c1"})
	if st.Status != task.Status_STOPPED || st.ExitStatus != 3 || st.ExitedAt == nil {
		t.Errorf("state after exit: %v", st)
	}
	if _, err := h.svc.Kill(h.ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); err != nil {
		t.Errorf("kill of a stopped task: %v, want success", err)
	}
	if err := h.exec("c1", "late", nil); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("exec after the init exited: %v, want ErrFailedPrecondition", err)
	}
	if _, err := h.svc.Pause(h.ctx, &taskAPI.PauseRequest{ID: "c1"}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Errorf("pause of a stopped task: %v, want ErrFailedPrecondition", err)
	}
	sr, err := h.svc.Stats(h.ctx, &taskAPI.StatsRequest{ID: "c1"})
	if err != nil {
		t.Fatalf("stats after exit: %v", err)
	}
	v, err := typeurl.UnmarshalAny(sr.Stats)
	if m, ok := v.(*stats.Metrics); err != nil || !ok || m.GetMemoryEvents().GetOomKill() != 1 {
		t.Errorf("stats after exit: %T %v %v (type %s)", v, v, err, sr.Stats.GetTypeUrl())
	}
	if _, err := h.svc.Checkpoint(h.ctx, &taskAPI.CheckpointTaskRequest{ID: "c1"}); !errdefs.IsNotImplemented(errgrpc.ToNative(err)) ||
		!strings.Contains(err.Error(), "checkpoint is not supported by macvm") {
		t.Errorf("checkpoint: %v", err)
	}
	if _, err := h.svc.Shutdown(h.ctx, &taskAPI.ShutdownRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
		t.Fatal("Shutdown ended the shim while it still had a container")
	default:
	}

	dr, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c1"})
	if err != nil || dr.ExitStatus != 3 || dr.Pid != 101 {
		t.Fatalf("delete: %v, %v", dr, err)
	}
	// The last delete tears the VM down in the background; the shim's
	// shutdown waits for it.
	h.svc.waitTeardowns(h.ctx)
	for _, call := range []string{"Reseed", "SetTime", "CreateContainer", "DeleteContainer", "Shutdown"} {
		if !h.agent.called(call) {
			t.Errorf("the agent never got %s", call)
		}
	}
	select {
	case <-h.machine(0).Done():
	default:
		t.Error("delete left the VM running")
	}
	if _, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "c1"}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		t.Errorf("state after delete: %v, want ErrNotFound", err)
	}
	wantEvents(t, h.events(4), "create c1", "start c1", "exit c1 3", "delete c1")

	if _, err := h.svc.Shutdown(h.ctx, &taskAPI.ShutdownRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown without containers did not end the shim")
	}
}

// TestExecExitPublishedBeforeInitExit kills the init while an exec runs:
// the exec's TaskExit must come first, whatever order the guest reports.
func TestExecExitPublishedBeforeInitExit(t *testing.T) {
	h := newHarness(t, nil)
	h.create("c", nil)
	h.start("c", "")
	if err := h.exec("c", "e1", nil); err != nil {
		t.Fatal(err)
	}
	if err := h.exec("c", "e1", nil); !errdefs.IsAlreadyExists(err) {
		t.Errorf("duplicate exec id: %v, want ErrAlreadyExists", err)
	}
	h.start("c", "e1")
	pids, err := h.svc.Pids(h.ctx, &taskAPI.PidsRequest{ID: "c"})
	if err != nil || len(pids.Processes) != 2 {
		t.Fatalf("pids: %v, %v", pids, err)
	}
	if _, err := h.svc.Kill(h.ctx, &taskAPI.KillRequest{ID: "c", Signal: uint32(syscall.SIGKILL)}); err != nil {
		t.Fatal(err)
	}
	if got := h.wait("c", ""); got != 137 {
		t.Errorf("init exit %d, want 137", got)
	}
	if got := h.wait("c", "e1"); got != 137 {
		t.Errorf("exec exit %d, want 137", got)
	}
	if _, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c"}); err != nil {
		t.Fatal(err)
	}
	wantEvents(t, h.events(7), "create c", "start c", "exec-added e1", "exec-started e1", "exit e1 137", "exit c 137", "delete c")
}

// TestVMLossKillsEverything crashes the VM under a running init and exec:
// both are reported killed (exec first), nothing hangs, and the container
// can still be inspected and deleted.
func TestVMLossKillsEverything(t *testing.T) {
	h := newHarness(t, nil)
	h.create("c", nil)
	h.start("c", "")
	if err := h.exec("c", "e1", nil); err != nil {
		t.Fatal(err)
	}
	h.start("c", "e1")
	h.machine(0).crash()
	if got := h.wait("c", ""); got != 137 {
		t.Errorf("init exit %d, want 137", got)
	}
	if got := h.wait("c", "e1"); got != 137 {
		t.Errorf("exec exit %d, want 137", got)
	}
	if _, err := h.svc.Kill(h.ctx, &taskAPI.KillRequest{ID: "c", Signal: 9, All: true}); err != nil {
		t.Errorf("kill after VM loss: %v", err)
	}
	if _, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "c"}); err != nil {
		t.Fatal(err)
	}
	wantEvents(t, h.events(7), "create c", "start c", "exec-added e1", "exec-started e1", "exit e1 137", "exit c 137", "delete c")
}

// TestStartPrecedesExit lets processes exit as fast as they can: TaskStart
// must still be published before TaskExit every time.
func TestStartPrecedesExit(t *testing.T) {
	h := newHarness(t, func(p *fakeProc) { p.exitWith(0) })
	const n = 20
	for i := range n {
		id := fmt.Sprintf("c%d", i)
		h.create(id, nil)
		h.start(id, "")
		h.wait(id, "")
	}
	_, evts := h.rec.snapshot()
	started := map[string]bool{}
	for _, e := range evts {
		switch e := e.(type) {
		case *eventstypes.TaskStart:
			started[e.ContainerID] = true
		case *eventstypes.TaskExit:
			if !started[e.ContainerID] {
				t.Errorf("TaskExit of %s before its TaskStart", e.ContainerID)
			}
		}
	}
}

// TestStdinEOFOnlyOnCloseIO checks that a client closing its end of the
// stdin FIFO (a detach) does not end the process's input, that a client
// re-attaching can go on writing, and that CloseIO delivers everything and
// then EOF.
func TestStdinEOFOnlyOnCloseIO(t *testing.T) {
	h := newHarness(t, func(p *fakeProc) {
		io.Copy(p.stdout, p.stdin)
		p.exitWith(0)
	})
	stdin, stdout := h.fifo("in"), h.fifo("out")
	outC := readAll(stdout)
	h.create("c", &taskAPI.CreateTaskRequest{Stdin: stdin, Stdout: stdout})
	h.start("c", "")

	w, err := os.OpenFile(stdin, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "first ")
	w.Close()
	time.Sleep(300 * time.Millisecond)
	if st, _ := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "c"}); st.Status != task.Status_RUNNING {
		t.Fatalf("the process ended when the client detached from stdin: %v", st)
	}
	w, err = os.OpenFile(stdin, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "second")
	if _, err := h.svc.CloseIO(h.ctx, &taskAPI.CloseIORequest{ID: "c", Stdin: true}); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if got := h.wait("c", ""); got != 0 {
		t.Errorf("exit %d", got)
	}
	if got := <-outC; got != "first second" {
		t.Errorf("the process read %q, want %q", got, "first second")
	}
}

func TestPauseResumeUpdateOOM(t *testing.T) {
	h := newHarness(t, nil)
	h.create("c", nil)
	h.start("c", "")
	if _, err := h.svc.Pause(h.ctx, &taskAPI.PauseRequest{ID: "c"}); err != nil {
		t.Fatal(err)
	}
	if st, _ := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "c"}); st.Status != task.Status_PAUSED {
		t.Errorf("state after pause: %v", st.Status)
	}
	if _, err := h.svc.Pause(h.ctx, &taskAPI.PauseRequest{ID: "c"}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Errorf("pause twice: %v, want ErrFailedPrecondition", err)
	}
	if _, err := h.svc.Resume(h.ctx, &taskAPI.ResumeRequest{ID: "c"}); err != nil {
		t.Fatal(err)
	}
	limit := int64(64 << 20)
	res, _ := json.Marshal(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
	if _, err := h.svc.Update(h.ctx, &taskAPI.UpdateTaskRequest{ID: "c", Resources: &anypb.Any{TypeUrl: "x", Value: res}}); err != nil {
		t.Fatal(err)
	}
	if !h.agent.called(`UpdateResources {"memory":{"limit":67108864}}`) {
		t.Errorf("update did not reach the agent: %v", h.agent.calls)
	}
	h.agent.events <- &agent.Event{Event: &agent.Event_Oom{Oom: &agent.OOMEvent{ContainerId: "c"}}}
	wantEvents(t, h.events(5), "create c", "start c", "paused c", "resumed c", "oom c")
	if _, err := h.svc.ResizePty(h.ctx, &taskAPI.ResizePtyRequest{ID: "c", Width: 80, Height: 25}); err != nil || !h.agent.called("ResizePty 80x25") {
		t.Errorf("resize: %v", err)
	}
	c, err := h.svc.Connect(h.ctx, &taskAPI.ConnectRequest{ID: "c"})
	if err != nil || c.TaskPid != 101 || c.ShimPid != uint32(os.Getpid()) {
		t.Errorf("connect: %v %v", c, err)
	}
}

// TestCreateFailures checks that a broken setup fails Create with an error
// that says what to fix, never with NotImplemented (containerd would fall
// back to the v2 task API), and leaves no VM behind.
func TestCreateFailures(t *testing.T) {
	h := newHarness(t, nil)
	opts, _ := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigBody: []byte(`kernel = "/nonexistent/vmlinux"`)})
	_, err := h.svc.Create(h.ctx, &taskAPI.CreateTaskRequest{ID: "k", Bundle: h.bundle("k", nil), Options: opts})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/vmlinux") || errdefs.IsNotImplemented(errgrpc.ToNative(err)) {
		t.Errorf("missing kernel: %v", err)
	}
	_, err = h.svc.Create(h.ctx, &taskAPI.CreateTaskRequest{ID: "a", Options: h.opts, Bundle: h.bundle("a", func(s *specs.Spec) {
		s.Annotations = map[string]string{AnnotationMemoryMiB: "1"}
	})})
	if !errdefs.IsInvalidArgument(errgrpc.ToNative(err)) {
		t.Errorf("bad annotation: %v", err)
	}
	_, err = h.svc.Create(h.ctx, &taskAPI.CreateTaskRequest{ID: "s", Options: h.opts, Bundle: h.bundle("s", nil), Stdout: "syslog://x"})
	if err == nil || errdefs.IsNotImplemented(errgrpc.ToNative(err)) {
		t.Errorf("unsupported stdio: %v, want an error other than NotImplemented", err)
	}
	h.mu.Lock()
	for _, m := range h.machines {
		select {
		case <-m.Done():
		default:
			t.Error("a failed Create left a VM running")
		}
	}
	h.mu.Unlock()
	if _, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "a"}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		t.Errorf("a failed Create left a task: %v", err)
	}
}

// TestCreateOfWedgedGuest: containerd's Create has no deadline, so an agent
// that never answers CreateContainer must fail the create after
// createTimeout, with the console in the error, and the VM must be stopped.
func TestCreateOfWedgedGuest(t *testing.T) {
	old := createTimeout
	createTimeout = 300 * time.Millisecond
	defer func() { createTimeout = old }()
	h := newHarness(t, nil)
	h.agent.hangCreate = true
	start := time.Now()
	_, err := h.svc.Create(h.ctx, &taskAPI.CreateTaskRequest{ID: "w", Options: h.opts, Bundle: h.bundle("w", nil)})
	if err == nil {
		t.Fatal("create of a wedged guest succeeded")
	}
	if msg := err.Error(); !strings.Contains(msg, "did not answer within 300ms") || !strings.Contains(msg, "fake console") {
		t.Errorf("error %q names neither the bound nor the console", msg)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the create took %v", d)
	}
	select {
	case <-h.machine(0).Done():
	default:
		t.Error("the VM of a wedged create was not stopped")
	}
	if _, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "w"}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		t.Errorf("a timed-out Create left a task: %v", err)
	}
}

// TestKillOfWedgedGuest: SIGKILL must end the container even when the
// agent never answers; the VM is stopped and everything reports 137.
func TestKillOfWedgedGuest(t *testing.T) {
	old := killTimeout
	killTimeout = 200 * time.Millisecond
	defer func() { killTimeout = old }()
	h := newHarness(t, nil)
	h.agent.wedged = true
	h.create("c", nil)
	h.start("c", "")
	start := time.Now()
	if _, err := h.svc.Kill(h.ctx, &taskAPI.KillRequest{ID: "c", Signal: uint32(syscall.SIGKILL)}); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if got := h.wait("c", ""); got != 137 {
		t.Errorf("exit %d, want 137", got)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the kill took %v", d)
	}
	select {
	case <-h.machine(0).Done():
	default:
		t.Error("the VM of a wedged guest was not stopped")
	}
}

// TestInitExitKillsTheRestOnlyWithoutOwnPIDNamespace: when an init with a
// PID namespace of its own exits, the guest kernel has already killed the
// rest of its container, so its TaskExit waits for no kill round trip to
// the guest; an init sharing a PID namespace gets the kill, as with runc.
func TestInitExitKillsTheRestOnlyWithoutOwnPIDNamespace(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ns       []specs.LinuxNamespace
		wantKill bool
	}{
		{"own PID namespace", []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}}, false},
		{"the VM's PID namespace", []specs.LinuxNamespace{{Type: specs.MountNamespace}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(p *fakeProc) { p.exitWith(0) })
			h.create("c", &taskAPI.CreateTaskRequest{Bundle: h.bundle("c", func(s *specs.Spec) { s.Linux.Namespaces = tc.ns })})
			h.start("c", "")
			h.wait("c", "")
			if got := h.agent.called("Signal  9 all=true"); got != tc.wantKill {
				t.Errorf("kill of the container's other processes after the init's exit: %v, want %v", got, tc.wantKill)
			}
		})
	}
}

// TestExitStatsWithoutRoundTrip: stats the agent sends with an init's exit
// are the snapshot the shim keeps for Stats once the VM is gone, and no
// Stats call went to the guest between the exit and TaskExit; without them
// the shim asks (an older agent), as TestTaskLifecycle checks.
func TestExitStatsWithoutRoundTrip(t *testing.T) {
	h := newHarness(t, func(p *fakeProc) { p.exitWith(0) })
	h.agent.exitStats = &stats.Metrics{Pids: &stats.PidsStat{Current: 7}}
	h.create("c", nil)
	h.start("c", "")
	h.wait("c", "")
	if h.agent.called("Stats") {
		t.Error("the shim asked the guest for stats after an exit that carried them")
	}
	c, err := h.svc.get("c")
	if err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	kept := c.stats
	c.mu.Unlock()
	if kept.GetPids().GetCurrent() != 7 {
		t.Errorf("stats kept after the exit: %v, want the exit's (7 pids)", kept)
	}
}
