package service

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// halfConn is one end of an in-memory, half-closable byte stream: the
// stand-in for a transport stream.
type halfConn struct {
	r *io.PipeReader
	w *io.PipeWriter
}

func streamPair() (host, guest *halfConn) {
	hr, gw := io.Pipe()
	gr, hw := io.Pipe()
	return &halfConn{hr, hw}, &halfConn{gr, gw}
}

func (c *halfConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *halfConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *halfConn) CloseWrite() error           { return c.w.Close() }
func (c *halfConn) Close() error {
	c.w.Close()
	return c.r.Close()
}
func (c *halfConn) LocalAddr() net.Addr              { return fakeAddr{} }
func (c *halfConn) RemoteAddr() net.Addr             { return fakeAddr{} }
func (c *halfConn) SetDeadline(time.Time) error      { return nil }
func (c *halfConn) SetReadDeadline(time.Time) error  { return nil }
func (c *halfConn) SetWriteDeadline(time.Time) error { return nil }

type fakeAddr struct{}

func (fakeAddr) Network() string { return "fake" }
func (fakeAddr) String() string  { return "fake" }

// fakeProc is a guest process of the fake agent. Its behaviour is the
// agent's run function, started by StartProcess.
type fakeProc struct {
	cid, execID string
	pid         uint32
	stdin       *halfConn
	stdout      *halfConn
	stderr      *halfConn

	once   sync.Once
	exit   chan struct{}
	status uint32
}

// exitWith ends the process: its output streams close (the agent drains
// them before WaitProcess answers), then the exit is reported.
func (p *fakeProc) exitWith(status uint32) {
	p.once.Do(func() {
		for _, c := range []*halfConn{p.stdout, p.stderr} {
			if c != nil {
				c.CloseWrite()
			}
		}
		p.status = status
		close(p.exit)
	})
}

// fakeAgent implements agentClient in process. run decides what a started
// process does; by default it waits to be signalled.
type fakeAgent struct {
	run func(p *fakeProc)
	// wedged makes SignalProcess hang, like an agent stuck in the guest.
	wedged bool
	// hangCreate makes CreateContainer wait for its context to end, like an
	// agent stuck loading modules or mounting the rootfs.
	hangCreate bool
	// reseedErr is what Reseed fails with (nil: it succeeds).
	reseedErr error
	// exitStats are sent with an init's exit (WaitProcess), as the agent
	// does; nil sends none, as an older agent.
	exitStats *stats.Metrics

	// mu guards everything below.
	mu      sync.Mutex
	streams map[string]*halfConn
	procs   map[string]*fakeProc
	// specs are the guest specs CreateContainer got, by container.
	specs   map[string][]byte
	nextPid uint32
	calls   []string
	// creates are the CreateContainer requests, by container.
	creates map[string]*agent.CreateContainerRequest
	events  chan *agent.Event
	done    chan struct{}
	closed  bool
}

func newFakeAgent(run func(p *fakeProc)) *fakeAgent {
	return &fakeAgent{
		run:     run,
		streams: map[string]*halfConn{},
		procs:   map[string]*fakeProc{},
		specs:   map[string][]byte{},
		nextPid: 100,
		events:  make(chan *agent.Event, 16),
		done:    make(chan struct{}),
	}
}

func (a *fakeAgent) record(call string) {
	a.mu.Lock()
	a.calls = append(a.calls, call)
	a.mu.Unlock()
}

func (a *fakeAgent) called(call string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.calls {
		if c == call {
			return true
		}
	}
	return false
}

func (a *fakeAgent) OpenStream(name string) (net.Conn, error) {
	host, guest := streamPair()
	a.mu.Lock()
	a.streams[name] = guest
	a.mu.Unlock()
	return host, nil
}

func (a *fakeAgent) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.closed {
		a.closed = true
		close(a.done)
	}
	return nil
}

func (a *fakeAgent) Done() <-chan struct{} { return a.done }

func (a *fakeAgent) newProc(cid, execID string, stdio *agent.Stdio) *fakeProc {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nextPid++
	p := &fakeProc{cid: cid, execID: execID, pid: a.nextPid, exit: make(chan struct{})}
	p.stdin = a.streams[stdio.GetStdin()]
	p.stdout = a.streams[stdio.GetStdout()]
	p.stderr = a.streams[stdio.GetStderr()]
	a.procs[cid+"/"+execID] = p
	return p
}

func (a *fakeAgent) proc(cid, execID string) (*fakeProc, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, ok := a.procs[cid+"/"+execID]
	if !ok {
		return nil, fmt.Errorf("process %s/%s: %w", cid, execID, errdefs.ErrNotFound)
	}
	return p, nil
}

func (a *fakeAgent) Info(context.Context, *emptypb.Empty) (*agent.InfoResponse, error) {
	return &agent.InfoResponse{ProtocolVersion: 1}, nil
}

func (a *fakeAgent) SetTime(context.Context, *agent.SetTimeRequest) (*emptypb.Empty, error) {
	a.record("SetTime")
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) Reseed(_ context.Context, r *agent.ReseedRequest) (*emptypb.Empty, error) {
	a.record("Reseed")
	if a.reseedErr != nil {
		return nil, a.reseedErr
	}
	if len(r.GetEntropy()) < 32 {
		return nil, fmt.Errorf("reseed: %d bytes: %w", len(r.GetEntropy()), errdefs.ErrInvalidArgument)
	}
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) CreateContainer(ctx context.Context, r *agent.CreateContainerRequest) (*agent.CreateContainerResponse, error) {
	a.record("CreateContainer")
	a.mu.Lock()
	a.specs[r.GetContainerId()] = r.GetSpec()
	a.mu.Unlock()
	if a.hangCreate {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	a.mu.Lock()
	if a.creates == nil {
		a.creates = map[string]*agent.CreateContainerRequest{}
	}
	a.creates[r.GetContainerId()] = r
	a.mu.Unlock()
	p := a.newProc(r.GetContainerId(), "", r.GetStdio())
	return &agent.CreateContainerResponse{Pid: p.pid}, nil
}

func (a *fakeAgent) StartProcess(_ context.Context, r *agent.StartProcessRequest) (*agent.StartProcessResponse, error) {
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	if a.run != nil {
		go a.run(p)
	}
	return &agent.StartProcessResponse{Pid: p.pid}, nil
}

func (a *fakeAgent) ExecProcess(_ context.Context, r *agent.ExecProcessRequest) (*emptypb.Empty, error) {
	a.newProc(r.GetContainerId(), r.GetExecId(), r.GetStdio())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) SignalProcess(ctx context.Context, r *agent.SignalProcessRequest) (*emptypb.Empty, error) {
	a.record(fmt.Sprintf("Signal %s %d all=%v", r.GetExecId(), r.GetSignal(), r.GetAll()))
	if a.wedged {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	sig := syscall.Signal(r.GetSignal())
	if sig != syscall.SIGKILL && sig != syscall.SIGTERM {
		return &emptypb.Empty{}, nil
	}
	if r.GetAll() {
		a.mu.Lock()
		var ps []*fakeProc
		for _, p := range a.procs {
			if p.cid == r.GetContainerId() {
				ps = append(ps, p)
			}
		}
		a.mu.Unlock()
		// Execs die first, as the kernel's PID namespace teardown does.
		for _, p := range ps {
			if p.execID != "" {
				p.exitWith(128 + uint32(sig))
			}
		}
		for _, p := range ps {
			p.exitWith(128 + uint32(sig))
		}
		return &emptypb.Empty{}, nil
	}
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	p.exitWith(128 + uint32(sig))
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) WaitProcess(ctx context.Context, r *agent.WaitProcessRequest) (*agent.WaitProcessResponse, error) {
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exit:
		resp := &agent.WaitProcessResponse{ExitStatus: p.status, ExitedAt: timestamppb.Now()}
		if r.GetExecId() == "" {
			resp.Metrics = a.exitStats
		}
		return resp, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-a.done:
		return nil, fmt.Errorf("agent gone: %w", errdefs.ErrUnavailable)
	}
}

func (a *fakeAgent) DeleteProcess(_ context.Context, r *agent.DeleteProcessRequest) (*emptypb.Empty, error) {
	a.record("DeleteProcess " + r.GetExecId())
	return &emptypb.Empty{}, nil
}

// DeleteContainer kills what is left of the container, as the agent does.
func (a *fakeAgent) DeleteContainer(_ context.Context, r *agent.DeleteContainerRequest) (*emptypb.Empty, error) {
	a.record("DeleteContainer")
	a.record("DeleteContainer " + r.GetContainerId())
	a.mu.Lock()
	var ps []*fakeProc
	for _, p := range a.procs {
		if p.cid == r.GetContainerId() {
			ps = append(ps, p)
		}
	}
	a.mu.Unlock()
	for _, p := range ps {
		p.exitWith(137)
	}
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) ResizePty(_ context.Context, r *agent.ResizePtyRequest) (*emptypb.Empty, error) {
	a.record(fmt.Sprintf("ResizePty %dx%d", r.GetWidth(), r.GetHeight()))
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) CloseStdin(context.Context, *agent.CloseStdinRequest) (*emptypb.Empty, error) {
	a.record("CloseStdin")
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) Pids(_ context.Context, r *agent.PidsRequest) (*agent.PidsResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []*agent.ProcessInfo
	for _, p := range a.procs {
		select {
		case <-p.exit:
			continue
		default:
		}
		if p.cid == r.GetContainerId() {
			out = append(out, &agent.ProcessInfo{Pid: p.pid, ExecId: p.execID})
		}
	}
	return &agent.PidsResponse{Processes: out}, nil
}

func (a *fakeAgent) Stats(context.Context, *agent.StatsRequest) (*agent.StatsResponse, error) {
	a.record("Stats")
	return &agent.StatsResponse{Metrics: &stats.Metrics{
		Pids:         &stats.PidsStat{Current: 1},
		MemoryEvents: &stats.MemoryEvents{OomKill: 1},
	}}, nil
}

func (a *fakeAgent) UpdateResources(_ context.Context, r *agent.UpdateResourcesRequest) (*emptypb.Empty, error) {
	a.record("UpdateResources " + string(r.GetResources()))
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) Pause(context.Context, *agent.PauseRequest) (*emptypb.Empty, error) {
	a.record("Pause")
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) Resume(context.Context, *agent.ResumeRequest) (*emptypb.Empty, error) {
	a.record("Resume")
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) WaitEvents(ctx context.Context, _ *agent.WaitEventsRequest) (*agent.WaitEventsResponse, error) {
	select {
	case e := <-a.events:
		return &agent.WaitEventsResponse{Events: []*agent.Event{e}}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-a.done:
		return nil, errdefs.ErrUnavailable
	}
}

func (a *fakeAgent) PrepareShares(_ context.Context, r *agent.PrepareSharesRequest) (*emptypb.Empty, error) {
	a.record("PrepareShares " + strings.Join(r.GetTags(), ","))
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) Shutdown(context.Context, *emptypb.Empty) (*emptypb.Empty, error) {
	a.record("Shutdown")
	return &emptypb.Empty{}, nil
}

// fakeMachine is a VM that does nothing but can crash on demand.
type fakeMachine struct {
	cfg  vm.Config
	once sync.Once
	done chan struct{}
}

func (m *fakeMachine) Start(context.Context) error { return nil }
func (m *fakeMachine) AgentConn(context.Context) (net.Conn, error) {
	c, _ := net.Pipe()
	return c, nil
}
func (m *fakeMachine) Pause(context.Context) error  { return nil }
func (m *fakeMachine) Resume(context.Context) error { return nil }
func (m *fakeMachine) Stop(context.Context) error {
	m.crash()
	return nil
}
func (m *fakeMachine) crash()                 { m.once.Do(func() { close(m.done) }) }
func (m *fakeMachine) Done() <-chan struct{}  { return m.done }
func (m *fakeMachine) Err() error             { return nil }
func (m *fakeMachine) ConsoleTail(int) string { return "fake console" }
func (m *fakeMachine) Pid() int               { return 0 }
func (m *fakeMachine) BootStarted() time.Time { return time.Time{} }

// fakeMounter records the pod share's host mounts instead of mounting.
type fakeMounter struct {
	// mu guards mounted.
	mu sync.Mutex
	// mounted maps a target to "bind SRC [ro]" or "rootfs".
	mounted map[string]string
	// submounts names the bind sources reported to have mounts below them.
	submounts map[string]bool
}

func newFakeMounter() *fakeMounter { return &fakeMounter{mounted: map[string]string{}} }

func (m *fakeMounter) mountAll(_ []mount.Mount, target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mounted[target] = "rootfs"
	return nil
}

func (m *fakeMounter) bind(src, target string, ro readOnly) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mounted[target] = "bind " + src
	switch ro {
	case readOnlyTop:
		m.mounted[target] += " ro"
	case readOnlyAll:
		m.mounted[target] += " rro"
	}
	return m.submounts[src], nil
}

func (m *fakeMounter) unmountAll(dir string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for t := range m.mounted {
		if t == dir || strings.HasPrefix(t, dir+"/") {
			delete(m.mounted, t)
		}
	}
	return nil
}

// get returns what is mounted on target ("" for nothing).
func (m *fakeMounter) get(target string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mounted[target]
}

// count returns how many mounts are left.
func (m *fakeMounter) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.mounted)
}
