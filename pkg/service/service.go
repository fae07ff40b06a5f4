// Package service is the containerd side of macvm: the shim manager (the
// start and delete actions) and the Task API v3 served over ttrpc, with one
// VM per container. It speaks containerd (bootstrap, tasks, events, FIFOs,
// host mounts, OCI hooks) and drives a VM through pkg/vm.Machine and the
// guest agent through its RPC client; it knows no hypervisor.
package service

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"

	eventstypes "github.com/containerd/containerd/api/events"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// Version is reported by Connect and Info.
const Version = "0.1.0"

var empty = &emptypb.Empty{}

// Service implements containerd's Task API v3 for one pod: one VM (the
// sandbox) running every container of the pod.
type Service struct {
	ctx     context.Context
	events  *eventQueue
	sd      shutdown.Service
	backend backend
	// exeDir is where the shim binary lives; default boot files are found
	// relative to it.
	exeDir string

	// stateBase is where VM state directories are made.
	stateBase string

	// mu guards containers, creating, sb, teardowns and closing.
	mu         sync.Mutex
	containers map[string]*container
	// creating reserves IDs whose Create is in flight.
	creating map[string]bool
	// sb is the pod's VM, nil before the first create and after the last
	// container is deleted.
	sb *sandbox
	// teardowns are closed when the VMs released by the last Delete of
	// their pod are torn down (releaseSandboxIfIdle); done ones are pruned.
	teardowns []chan struct{}
	// closing is set once the shim ends (Shutdown, or a signal): creates
	// and execs are refused from then on.
	closing bool

	// socket is the shim's listening socket, released (unlinked) once when
	// the shim ends (releaseSocket); nil when unknown (tests, or a daemon
	// not started by the start action).
	socket        *shimSocket
	releaseSocket sync.Once
}

var _ taskAPI.TTRPCTaskService = (*Service)(nil)

// NewTaskService returns the task service; publisher carries its events to
// containerd, and sd ends the shim process.
func NewTaskService(ctx context.Context, publisher Publisher, sd shutdown.Service) (*Service, error) {
	s, err := newService(ctx, publisher, sd, platformBackend())
	if err != nil {
		return nil, err
	}
	if s.socket, err = inheritedSocket(); err != nil {
		log.G(ctx).WithError(err).Warn("shim socket unknown: it is not given up early at shutdown")
	}
	return s, nil
}

// Publisher is the publishing half of containerd's shim.Publisher.
type Publisher = events.Publisher

func newService(ctx context.Context, publisher Publisher, sd shutdown.Service, b backend) (*Service, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	s := &Service{
		ctx:        ctx,
		events:     newEventQueue(ctx, publisher),
		sd:         sd,
		backend:    b,
		exeDir:     filepath.Dir(exe),
		stateBase:  defaultStateBase(),
		containers: map[string]*container{},
		creating:   map[string]bool{},
	}
	sd.RegisterCallback(s.shutdownAll)
	return s, nil
}

// RegisterTTRPC serves the task API on server.
func (s *Service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// shutdownAll runs when the shim exits: the VM, if still running, goes
// with it, and queued events are flushed.
func (s *Service) shutdownAll(ctx context.Context) error {
	s.beginShutdown(ctx)
	s.waitTeardowns(ctx)
	s.mu.Lock()
	cs := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		cs = append(cs, c)
	}
	sb := s.sb
	s.sb = nil
	s.mu.Unlock()
	for _, c := range cs {
		c.destroy(ctx)
	}
	if sb != nil {
		sb.destroy(ctx)
	}
	s.events.close(ctx)
	return nil
}

// sandboxFor returns the pod's VM, booting it for the first container:
// the caller whose create made it boots it (boot is true), the others wait
// for it. Called with r.ID reserved in s.creating.
func (s *Service) sandboxFor(ctx context.Context, id, ns, bundle string, cfg *Config) (sb *sandbox, boot bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sb != nil {
		return s.sb, false
	}
	base := s.stateBase
	if cfg.StateDir != "" {
		base = cfg.StateDir
	}
	s.sb = newSandbox(s.ctx, id, ns, bundle, base, cfg, s.events, s.backend.mounter)
	return s.sb, true
}

// releaseSandboxIfIdle tears the VM down when no container is left in it
// and no create is under way: the last Delete (or a failed first create)
// ends the pod's VM. With async the teardown (the guest's power-off, the
// hypervisor's exit, the host cleanup: most of a short container's
// teardown) goes on after the call returns: containerd's Delete does not
// wait for it, and the shim's shutdown and the next VM's boot do
// (waitTeardowns). A VM in a network namespace others see is torn down
// before the call returns (podNetwork.inHostNamespace).
func (s *Service) releaseSandboxIfIdle(ctx context.Context, sb *sandbox, async bool) {
	async = async && !sb.network.inHostNamespace()
	s.mu.Lock()
	idle := s.sb == sb && len(s.containers) == 0 && len(s.creating) == 0
	var done chan struct{}
	if idle {
		s.sb = nil
		if async {
			done = make(chan struct{})
			s.teardowns = append(pendingTeardowns(s.teardowns), done)
		}
	}
	s.mu.Unlock()
	switch {
	case !idle:
	case async:
		go func() {
			defer close(done)
			sb.destroy(context.WithoutCancel(ctx))
		}()
	default:
		sb.destroy(ctx)
	}
}

// pendingTeardowns drops the teardowns that are done.
func pendingTeardowns(ts []chan struct{}) []chan struct{} {
	pending := ts[:0]
	for _, t := range ts {
		select {
		case <-t:
		default:
			pending = append(pending, t)
		}
	}
	return pending
}

// waitTeardowns waits for the VMs being torn down in the background (or
// for ctx): the shim must not exit with a VM half torn down, and a new VM
// must not boot while an old one still holds its state directory.
func (s *Service) waitTeardowns(ctx context.Context) {
	s.mu.Lock()
	ts := pendingTeardowns(s.teardowns)
	s.teardowns = ts
	ts = append([]chan struct{}(nil), ts...)
	s.mu.Unlock()
	for _, t := range ts {
		select {
		case <-t:
		case <-ctx.Done():
			return
		}
	}
}

// initOwner names the container whose init has the (guest) pid the shim
// reported, among the pod's live containers; "" if none.
func (s *Service) initOwner(pid uint32) string {
	s.mu.Lock()
	cs := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	for _, c := range cs {
		if p, _, _ := c.init.exitInfo(); p == pid && !c.init.isExited() {
			return c.id
		}
	}
	return ""
}

// dropSandbox forgets a sandbox that failed to boot, so that the next
// create boots a fresh one.
func (s *Service) dropSandbox(sb *sandbox) {
	s.mu.Lock()
	if s.sb == sb {
		s.sb = nil
	}
	s.mu.Unlock()
}

func (s *Service) get(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok {
		return nil, fmt.Errorf("container %s: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (s *Service) getProcess(id, execID string) (*container, *process, error) {
	c, err := s.get(id)
	if err != nil {
		return nil, nil, err
	}
	p, err := c.process(execID)
	if err != nil {
		return nil, nil, err
	}
	return c, p, nil
}

// runtimeConfig reads the shim configuration named by the task's runtime
// options, if any.
func runtimeConfig(ctx context.Context, opts typeurl.Any) (*Config, error) {
	var path string
	var body []byte
	if opts != nil && opts.GetValue() != nil {
		v, err := typeurl.UnmarshalAny(opts)
		if err != nil {
			log.G(ctx).WithError(err).WithField("type_url", opts.GetTypeUrl()).Debug("ignoring unknown runtime options")
		} else if o, ok := v.(*runtimeoptions.Options); ok {
			path, body = o.GetConfigPath(), o.GetConfigBody()
		}
	}
	return loadConfig(path, body)
}

// Create boots the container's VM and creates the container in it.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	c, err := s.create(ctx, r)
	if err != nil {
		if errdefs.IsNotImplemented(err) {
			// containerd reads NotImplemented from Create as "this shim
			// only speaks task API v2" and retries with it: report an
			// unsupported setup as a precondition instead.
			err = fmt.Errorf("%s: %w", err.Error(), errdefs.ErrFailedPrecondition)
		}
		return nil, errgrpc.ToGRPC(err)
	}
	pid, _, _ := c.init.exitInfo()
	return &taskAPI.CreateTaskResponse{Pid: pid}, nil
}

func (s *Service) create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *container, retErr error) {
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, fmt.Errorf("restoring from a checkpoint is not supported by macvm: %w", errdefs.ErrInvalidArgument)
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return nil, fmt.Errorf("create %s: shim is shutting down: %w", r.ID, errdefs.ErrUnavailable)
	}
	if _, ok := s.containers[r.ID]; ok || s.creating[r.ID] {
		s.mu.Unlock()
		return nil, fmt.Errorf("container %s: %w", r.ID, errdefs.ErrAlreadyExists)
	}
	s.creating[r.ID] = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.creating, r.ID)
		s.mu.Unlock()
	}()

	done := timed(ctx, r.ID, "config and spec")
	cfg, err := runtimeConfig(ctx, r.Options)
	if err != nil {
		return nil, err
	}
	if err := cfg.resolve(s.exeDir, s.backend.lookupHypervisor); err != nil {
		return nil, err
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	done()
	ns, _ := namespaces.Namespace(ctx)
	s.waitTeardowns(ctx)
	sb, boot := s.sandboxFor(ctx, r.ID, ns, r.Bundle, cfg)
	c := &container{
		id:        r.ID,
		bundle:    r.Bundle,
		namespace: ns,
		spec:      spec,
		sb:        sb,
		events:    s.events,
		execs:     map[string]*process{},
	}
	defer func() {
		if retErr == nil {
			return
		}
		c.destroy(ctx)
		if boot && !sb.booted() {
			sb.finishBoot(retErr)
			s.dropSandbox(sb)
			sb.destroy(ctx)
			return
		}
		// A failed create in a running pod must not end the pod, unless
		// nothing else runs in it.
		s.mu.Lock()
		delete(s.creating, r.ID)
		s.mu.Unlock()
		s.releaseSandboxIfIdle(ctx, sb, false)
	}()

	root := containerRootfs{mounts: mount.FromProto(r.Rootfs)}
	if len(root.mounts) == 0 && spec.Root != nil && spec.Root.Path != "" {
		root.dir = spec.Root.Path
		if !filepath.IsAbs(root.dir) {
			root.dir = filepath.Join(r.Bundle, root.dir)
		}
	}
	var blk *blockRootfs
	if isBlockRootfs(root.mounts) {
		if blk, err = sb.attachBlockRootfs(r.ID, root.mounts, boot); err != nil {
			return nil, err
		}
		root.block = true
	}
	gs, err := copySpec(spec)
	if err != nil {
		return nil, err
	}
	if err := podNamespaces(gs, s.initOwner); err != nil {
		return nil, err
	}
	if boot {
		// BUNDLE/vm points at the VM's state (its console log) for
		// whoever debugs the first container; containerd removes the link
		// with the bundle.
		_ = os.Symlink(sb.stateDir, filepath.Join(r.Bundle, "vm"))
		if err := sb.boot(ctx, s.backend, spec, func() error { return c.runEarlyHooks(ctx) }); err != nil {
			return nil, err
		}
	} else if err := sb.wait(ctx); err != nil {
		return nil, fmt.Errorf("pod VM: %w", err)
	} else if !sb.alive() {
		return nil, fmt.Errorf("the pod's VM is gone: %w", errdefs.ErrUnavailable)
	}
	// The container's files are mounted below the share once the VM is
	// up: a VM from the warm-start pool serves a share directory of its
	// own, known only then (sandbox.boot relocates the share).
	done = timed(ctx, r.ID, "host mounts")
	if c.files, err = sb.share.add(r.ID, root, gs); err != nil {
		return nil, err
	}
	done()
	if blk != nil {
		c.files.rootfs, c.files.devices = blk.Rootfs, blk.Devices
	}
	stdio := stdioSpec{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	createErr := c.createInVM(ctx, stdio)
	if boot {
		// The guest setup ran meanwhile; the container's process must not
		// start before it is done (a clone's entropy, the clock), and a
		// failed setup fails the create.
		if err := sb.wait(context.WithoutCancel(ctx)); err != nil {
			return nil, err
		}
	}
	if createErr != nil {
		return nil, createErr
	}

	s.mu.Lock()
	s.containers[r.ID] = c
	s.mu.Unlock()
	pid, _, _ := c.init.exitInfo()
	s.events.send(&eventstypes.TaskCreate{
		ContainerID: r.ID,
		Bundle:      r.Bundle,
		Rootfs:      r.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Checkpoint:  r.Checkpoint,
		Pid:         pid,
	})
	return c, nil
}

func readSpec(bundle string) (*specs.Spec, error) {
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, fmt.Errorf("parse OCI spec: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return &spec, nil
}

// Start runs a created init or exec process.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	pid, err := p.start(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID == "" && c.spec.Hooks != nil && len(c.spec.Hooks.Poststart) > 0 {
		// A failing poststart hook is a warning in the OCI spec.
		if err := runHooks(ctx, "poststart", c.spec.Hooks.Poststart, c.ociState(specs.StateRunning)); err != nil {
			log.G(ctx).WithError(err).WithField("container_id", c.id).Warn("poststart hook")
		}
	}
	return &taskAPI.StartResponse{Pid: pid}, nil
}

// Delete forgets an exited exec, or tears down an exited container and its
// VM.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID != "" {
		resp, err := c.deleteExec(ctx, p)
		if err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		return resp, nil
	}
	resp, err := c.deleteInit(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	delete(s.containers, r.ID)
	s.mu.Unlock()
	s.releaseSandboxIfIdle(ctx, c.sb, true)
	return resp, nil
}

// Exec adds a process to a running container.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	closing := s.closing
	s.mu.Unlock()
	if closing {
		// After Shutdown{Now} the VM goes with the shim.
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s in %s: shim is shutting down: %w", r.ExecID, r.ID, errdefs.ErrUnavailable))
	}
	c, err := s.get(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.Spec == nil || len(r.Spec.GetValue()) == 0 {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s: no process spec: %w", r.ExecID, errdefs.ErrInvalidArgument))
	}
	// The Any holds the OCI Process as JSON, which is what the agent takes.
	var proc specs.Process
	if err := json.Unmarshal(r.Spec.GetValue(), &proc); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s: process spec: %v: %w", r.ExecID, err, errdefs.ErrInvalidArgument))
	}
	// containerd's client takes "terminal" from the IO (cio.WithTerminal), not from the process spec,
	// which usually comes from the container's non-tty spec: the request's flag wins, as in the runc
	// shim (spec.Terminal = r.Terminal). Otherwise the guest allocates no pty for a tty exec.
	proc.Terminal = r.Terminal
	procJSON, err := json.Marshal(&proc)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s: process spec: %v: %w", r.ExecID, err, errdefs.ErrInvalidArgument))
	}
	stdio := stdioSpec{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal}
	if err := c.exec(ctx, r.ExecID, procJSON, stdio); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return empty, nil
}

// ResizePty resizes a process's terminal (also before it starts).
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if p.isExited() {
		return empty, nil
	}
	if _, err := c.sb.client.ResizePty(ctx, &agent.ResizePtyRequest{ContainerId: c.id, ExecId: r.ExecID, Width: r.Width, Height: r.Height}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("resize pty: %w", err))
	}
	return empty, nil
}

// State reports a process as the shim knows it.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return p.stateResponse(c.bundle), nil
}

// Pause freezes the container (its cgroup in the guest).
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	p := c.init
	if _, err := p.currentState().next(evPause); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := c.sb.client.Pause(ctx, &agent.PauseRequest{ContainerId: c.id}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("pause: %w", err))
	}
	if err := p.transition(evPause); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.events.send(&eventstypes.TaskPaused{ContainerID: c.id})
	return empty, nil
}

// Resume thaws a paused container.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	p := c.init
	if _, err := p.currentState().next(evResume); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := c.sb.client.Resume(ctx, &agent.ResumeRequest{ContainerId: c.id}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("resume: %w", err))
	}
	if err := p.transition(evResume); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.events.send(&eventstypes.TaskResumed{ContainerID: c.id})
	return empty, nil
}

// Checkpoint is not supported: a VM's container cannot be checkpointed
// with CRIU from the host.
func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("checkpoint is not supported by macvm: %w", errdefs.ErrNotImplemented))
}

// Kill signals a process, or all of the container's processes. Killing a
// process that already exited succeeds, as containerd expects.
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	switch p.currentState() {
	case stateDeleted:
		return nil, errgrpc.ToGRPC(fmt.Errorf("process %s: %w", p.id(), errdefs.ErrNotFound))
	case stateStopped:
		if !r.All {
			return empty, nil
		}
	}
	if !c.sb.alive() {
		// The VM is gone: everything in it is dead already and its exit is
		// being reported.
		return empty, nil
	}
	// SIGKILL to the init (or to all) ends the container whatever state
	// the guest is in: if the guest does not comply in time, the VM goes.
	killAll := r.Signal == uint32(syscall.SIGKILL) && (r.ExecID == "" || r.All)
	if killAll {
		go c.ensureKilled()
	}
	sctx, cancel := context.WithTimeout(ctx, killTimeout)
	defer cancel()
	_, err = c.sb.client.SignalProcess(sctx, &agent.SignalProcessRequest{ContainerId: c.id, ExecId: r.ExecID, Signal: r.Signal, All: r.All})
	if err != nil {
		if errdefs.IsNotFound(err) || !c.sb.alive() || p.isExited() || killAll {
			return empty, nil
		}
		return nil, errgrpc.ToGRPC(fmt.Errorf("kill: %w", err))
	}
	return empty, nil
}

// Pids lists the container's processes (guest pids). For a live task the
// list is never empty: containerd treats an empty list as a leaked task.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	var procs []*task.ProcessInfo
	seen := map[uint32]bool{}
	if c.sb.alive() {
		resp, err := c.sb.client.Pids(ctx, &agent.PidsRequest{ContainerId: c.id})
		if err != nil && c.sb.alive() {
			return nil, errgrpc.ToGRPC(fmt.Errorf("pids: %w", err))
		}
		for _, pi := range resp.GetProcesses() {
			info := &task.ProcessInfo{Pid: pi.GetPid()}
			if pi.GetExecId() != "" {
				if a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: pi.GetExecId()}); err == nil {
					info.Info = a
				}
			}
			seen[pi.GetPid()] = true
			procs = append(procs, info)
		}
	}
	if pid, _, _ := c.init.exitInfo(); pid != 0 && !seen[pid] {
		switch c.init.currentState() {
		case stateCreated, stateRunning, statePaused:
			procs = append([]*task.ProcessInfo{{Pid: pid}}, procs...)
		}
	}
	return &taskAPI.PidsResponse{Processes: procs}, nil
}

// CloseIO closes a process's stdin once what the client wrote is delivered.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if !r.Stdin || p.pio == nil {
		return empty, nil
	}
	p.pio.closeStdin(ctx)
	if c.sb.alive() && !p.isExited() {
		if _, err := c.sb.client.CloseStdin(ctx, &agent.CloseStdinRequest{ContainerId: c.id, ExecId: r.ExecID}); err != nil &&
			!errdefs.IsNotFound(err) && c.sb.alive() {
			return nil, errgrpc.ToGRPC(fmt.Errorf("close stdin: %w", err))
		}
	}
	return empty, nil
}

// Update changes the container's resources (its cgroup in the guest).
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.Resources == nil {
		return empty, nil
	}
	var res specs.LinuxResources
	if err := json.Unmarshal(r.Resources.GetValue(), &res); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("update: resources: %v: %w", err, errdefs.ErrInvalidArgument))
	}
	data, err := json.Marshal(&res)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if _, err := c.sb.client.UpdateResources(ctx, &agent.UpdateResourcesRequest{ContainerId: c.id, Resources: data}); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("update: %w", err))
	}
	return empty, nil
}

// Wait blocks until a process has exited and its output is delivered.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp, err := p.wait(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return resp, nil
}

// Stats returns the container's cgroup v2 metrics, from the guest while the
// VM runs and from the last snapshot after the init exited.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	var m any
	if c.sb.alive() {
		resp, err := c.sb.client.Stats(ctx, &agent.StatsRequest{ContainerId: c.id})
		if err == nil && resp.GetMetrics() != nil {
			c.mu.Lock()
			c.stats = resp.GetMetrics()
			c.mu.Unlock()
			m = resp.GetMetrics()
		} else if err != nil && !c.init.isExited() {
			return nil, errgrpc.ToGRPC(fmt.Errorf("stats: %w", err))
		}
	}
	if m == nil {
		c.mu.Lock()
		cached := c.stats
		c.mu.Unlock()
		if cached == nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("stats of %s: the VM is gone and no snapshot was taken: %w", c.id, errdefs.ErrUnavailable))
		}
		m = cached
	}
	a, err := typeurl.MarshalAnyToProto(m)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

// Connect tells containerd (after its restart) who serves the task.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), Version: Version}
	if c, err := s.get(r.ID); err == nil {
		resp.TaskPid, _, _ = c.init.exitInfo()
	}
	return resp, nil
}

// Shutdown ends the shim once it serves no container.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	busy := len(s.containers) > 0 || len(s.creating) > 0
	if !busy || r.Now {
		// Decided under mu with the create reservation (create), so no
		// create slips in between.
		s.closing = true
	}
	s.mu.Unlock()
	if busy && !r.Now {
		return empty, nil
	}
	// The socket goes before this returns: containerd's delete returns
	// after it, and a container started next with the same ID must find
	// no socket, while this shim still tears its VM down (shutdownAll).
	s.beginShutdown(ctx)
	s.sd.Shutdown()
	return empty, nil
}

// beginShutdown refuses further creates and gives up the shim's socket
// path (socket.go), once.
func (s *Service) beginShutdown(ctx context.Context) {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.releaseSocket.Do(func() {
		if s.socket == nil {
			return
		}
		if err := s.socket.release(); err != nil {
			log.G(ctx).WithError(err).Warn("release the shim socket")
		}
	})
}
