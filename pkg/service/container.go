package service

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// Bounds on waits that involve the guest. Every wait on the guest is
// bounded: a wedged VM must never hang containerd's RPCs.
const (
	// ioDrainTimeout bounds how long an exit waits for the process's output
	// to reach the client before TaskExit is published anyway.
	ioDrainTimeout = 5 * time.Second
	// execExitTimeout bounds how long the init's exit waits for the execs'
	// exits (which must be published first) before they are forced.
	execExitTimeout = 5 * time.Second
	// teardownTimeout bounds the agent's shutdown and the VM's exit.
	teardownTimeout = 10 * time.Second
	// rpcTimeout bounds short agent RPCs made on the shim's own behalf.
	rpcTimeout = 5 * time.Second
)

// createTimeout bounds the agent RPCs of a create once the agent has
// answered (clock, container creation: module wait, rootfs mount, helper
// start). They take about a second even with ten TCG guests booting at
// once; the bound is separate from boot_timeout, which a busy host raises to
// minutes for the boot alone.
var createTimeout = 2 * time.Minute

// killTimeout is how long a SIGKILL of the container may take in the guest
// before the VM itself is stopped (a variable so tests can shorten it).
var killTimeout = 10 * time.Second

// container is one container and the VM it runs in.
type container struct {
	id        string
	bundle    string
	namespace string
	// spec is the OCI spec as containerd wrote it (host paths, hooks).
	spec    *specs.Spec
	cfg     *Config
	machine vm.Machine
	client  agentClient
	events  *eventQueue
	init    *process
	// rootfs is the host mount point of the snapshot, if the shim mounted it.
	rootfs   string
	stateDir string
	// vmCtx ends when the VM or the agent connection is gone (or the
	// container is torn down): every call into the guest uses it, so the
	// loss of the VM fails them all at once.
	vmCtx    context.Context
	vmCancel context.CancelFunc
	// tearingDown is closed when Delete shuts the VM down on purpose, so the
	// watchdog does not report it as a crash.
	tearingDown chan struct{}
	streamSeq   atomic.Uint64

	// mu guards execs, stats, state and deleted.
	mu    sync.Mutex
	execs map[string]*process
	// stats is the last metrics read from the guest, kept so that Stats
	// keeps answering after the init exited (CRI reads OOM kills then).
	stats *stats.Metrics
	// state is the bundle record, rewritten when the init exits.
	state   bundleState
	deleted bool
}

// streamPrefix returns a fresh stream name prefix for one process's stdio:
// names must be unique on the VM's channel, even when an exec ID is reused.
func (c *container) streamPrefix(execID string) string {
	n := c.streamSeq.Add(1)
	if execID == "" {
		return "init-" + strconv.FormatUint(n, 10)
	}
	return "exec-" + strconv.FormatUint(n, 10)
}

// vmStateDir picks the directory for the VM's sockets and console log.
// Unix socket paths are limited to 108 bytes, and containerd's bundle paths
// (with a 64-character ID) are often longer, so a long bundle gets a short
// directory under /run/macvm instead.
func vmStateDir(bundle, namespace, id string) string {
	dir := filepath.Join(bundle, "vm")
	if len(dir)+24 <= 100 {
		return dir
	}
	sum := sha256.Sum256([]byte(namespace + "/" + id + "/" + bundle))
	base := "/run/macvm"
	if st, err := os.Stat("/run"); err != nil || !st.IsDir() {
		base = filepath.Join(os.TempDir(), "macvm")
	}
	return filepath.Join(base, hex.EncodeToString(sum[:8]))
}

// guestSpec is the spec the agent gets: bind sources rewritten to shares,
// hooks removed (they ran, or will run, on the host).
func guestSpec(spec *specs.Spec) (*specs.Spec, []vm.Share, error) {
	data, err := json.Marshal(spec)
	if err != nil {
		return nil, nil, err
	}
	var gs specs.Spec
	if err := json.Unmarshal(data, &gs); err != nil {
		return nil, nil, err
	}
	gs.Hooks = nil
	shares, err := rewriteBindMounts(&gs, os.Stat)
	if err != nil {
		return nil, nil, err
	}
	return &gs, shares, nil
}

// ociState is the state JSON hooks get on stdin. The pid is the
// hypervisor's: the only process on the host that lives exactly as long as
// the container.
func (c *container) ociState(status specs.ContainerState) specs.State {
	pid := 0
	if c.machine != nil {
		pid = c.machine.Pid()
	}
	return specs.State{
		Version:     specs.Version,
		ID:          c.id,
		Status:      status,
		Pid:         pid,
		Bundle:      c.bundle,
		Annotations: c.spec.Annotations,
	}
}

// start boots the VM, connects to its agent and creates the container in
// it. On error everything started so far is undone by the caller's
// cleanup (c.destroy).
func (c *container) start(ctx context.Context, b backend, shares []vm.Share, gspec *specs.Spec, stdio stdioSpec) error {
	cpus, mem, err := c.cfg.vmSize(c.spec)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(c.stateDir, 0o700); err != nil {
		return fmt.Errorf("vm state dir: %w", err)
	}
	vcfg := vm.Config{
		ID:         c.id,
		StateDir:   c.stateDir,
		Kernel:     c.cfg.Kernel,
		Initrd:     c.cfg.Initrd,
		KernelArgs: c.cfg.KernelArgs,
		CPUs:       cpus,
		MemoryMiB:  mem,
		Shares:     shares,
		Hypervisor: c.cfg.Hypervisor,
		Templates:  c.cfg.templates(ctx),
	}
	client, err := c.boot(ctx, b, vcfg)
	if err != nil && vcfg.Templates != nil && vm.StartModeOf(c.machine) != vm.StartCold && ctx.Err() == nil {
		// A clone that came up but never answered: its template passed
		// the checks and is still wrong. Never a failed container for it.
		log.G(ctx).WithError(err).WithField("container_id", c.id).Warn("warm start: the clone's agent did not answer; booting cold")
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), teardownTimeout)
		c.machine.Stop(sctx)
		cancel()
		vcfg.Templates = nil
		client, err = c.boot(ctx, b, vcfg)
	}
	if err != nil {
		return err
	}
	m := c.machine
	c.client = client
	log.G(ctx).WithField("container_id", c.id).WithField("start_mode", string(vm.StartModeOf(m))).
		WithField("agent_ready", time.Since(m.BootStarted())).Info("VM ready")
	go c.watchdog()

	// containerd's Create carries no deadline (ctr run waits forever), so
	// the agent RPCs of the create are bounded here: a guest that stops
	// answering (a stuck module load or 9p mount, a lost stream) fails the
	// create with its console instead of hanging it. The ttrpc deadline
	// also reaches the agent, whose own waits then end too.
	cctx, cancel := context.WithTimeout(ctx, createTimeout)
	defer cancel()
	if err := c.reseed(cctx, client, vm.StartModeOf(m)); err != nil {
		return c.createError("reseed guest RNG", err)
	}
	if _, err := client.SetTime(cctx, &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil {
		return c.createError("set guest clock", err)
	}

	pio, err := newProcessIO(ctx, client, c.streamPrefix(""), stdio, c.id, c.namespace)
	if err != nil {
		return err
	}
	specJSON, err := json.Marshal(gspec)
	if err != nil {
		pio.close()
		return err
	}
	resp, err := client.CreateContainer(cctx, &agent.CreateContainerRequest{
		ContainerId: c.id,
		Spec:        specJSON,
		Rootfs:      []*agent.Mount{{Type: shareFSType, Source: rootfsTag, Options: shareMount(false)}},
		Stdio:       pio.names,
	})
	if err != nil {
		pio.close()
		return c.createError("create container in VM", err)
	}
	c.init = newProcess(c, "", stdio, pio, resp.GetPid())
	// The exit is waited for from now on: a process killed before Start, or
	// a VM that dies, is still reported.
	go c.waitExit(c.init)
	go c.watchEvents()
	go c.syncClock()

	if c.spec.Hooks != nil {
		h := c.spec.Hooks
		//nolint:staticcheck // Prestart is deprecated but still what older clients set.
		for _, hs := range []struct {
			kind  string
			hooks []specs.Hook
		}{{"prestart", h.Prestart}, {"createRuntime", h.CreateRuntime}, {"createContainer", h.CreateContainer}} {
			if err := runHooks(ctx, hs.kind, hs.hooks, c.ociState(specs.StateCreating)); err != nil {
				return err
			}
		}
	}
	return nil
}

// boot creates and starts the VM of vcfg (c.machine) and connects to its
// agent.
func (c *container) boot(ctx context.Context, b backend, vcfg vm.Config) (agentClient, error) {
	m, err := b.newMachine(vcfg)
	if err != nil {
		return nil, fmt.Errorf("configure VM: %w", err)
	}
	// The VM lives as long as the container, not as long as this RPC.
	if err := m.Start(context.WithoutCancel(ctx)); err != nil {
		return nil, fmt.Errorf("start VM: %w", err)
	}
	c.machine = m
	c.mu.Lock()
	c.state.VMPid = m.Pid()
	c.state.VMStateDir = c.stateDir
	c.state.Rootfs = c.rootfs
	st := c.state
	c.mu.Unlock()
	if err := writeBundleState(c.bundle, &st); err != nil {
		return nil, fmt.Errorf("record VM in bundle: %w", err)
	}
	log.G(ctx).WithField("container_id", c.id).WithField("vm_pid", m.Pid()).Debug("VM started")
	return c.connect(ctx, b)
}

// createError describes a failed agent RPC of the create; a time-out says
// which bound it hit and carries the end of the guest console, where the
// agent's own errors (and its goroutine dump on SIGQUIT) show.
func (c *container) createError(step string, err error) error {
	if !errdefs.IsDeadlineExceeded(err) && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", step, err)
	}
	return fmt.Errorf("%s: the guest agent did not answer within %v: %w; console: %s",
		step, createTimeout, err, c.machine.ConsoleTail(2048))
}

// connect waits for the agent of a booting VM, bounded by the boot timeout;
// on failure the error carries the end of the guest console, which is where
// a kernel panic or an agent crash shows.
func (c *container) connect(ctx context.Context, b backend) (agentClient, error) {
	timeout := c.cfg.bootTimeout()
	// The handshake context must not end with this RPC (the client may tie
	// its session to it), only when the boot times out, the RPC is
	// cancelled or the VM exits during boot.
	hctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	timer := time.AfterFunc(timeout, cancel)
	stopOnRPC := context.AfterFunc(ctx, cancel)
	booting := make(chan struct{})
	go func() {
		select {
		case <-c.machine.Done():
			cancel()
		case <-booting:
		}
	}()
	ok := false
	defer func() {
		close(booting)
		stopOnRPC()
		timer.Stop()
		if !ok {
			cancel()
		}
	}()

	conn, err := c.machine.AgentConn(hctx)
	if err == nil {
		var client agentClient
		client, err = b.dialAgent(hctx, conn)
		if err == nil {
			ok = true
			return client, nil
		}
	}
	cause := err
	select {
	case <-c.machine.Done():
		cause = fmt.Errorf("the VM exited during boot (%v): %w", c.machine.Err(), errdefs.ErrUnavailable)
	default:
		if hctx.Err() != nil && ctx.Err() == nil {
			cause = fmt.Errorf("the guest agent did not answer within %v (boot_timeout): %w", timeout, context.DeadlineExceeded)
		}
	}
	return nil, fmt.Errorf("connect to guest agent: %w; console: %s", cause, c.machine.ConsoleTail(2048))
}

// watchdog turns the loss of the VM or of the agent connection into the
// exit of every process: vmCtx ends, every pending WaitProcess fails, and
// each waiter reports exit 137.
func (c *container) watchdog() {
	var why string
	select {
	case <-c.machine.Done():
		why = fmt.Sprintf("VM exited: %v", c.machine.Err())
	case <-c.client.Done():
		why = "agent connection lost"
	case <-c.tearingDown:
		return
	}
	select {
	case <-c.tearingDown:
	default:
		log.G(c.vmCtx).WithField("container_id", c.id).WithField("console", c.machine.ConsoleTail(2048)).
			Error(why + ": every process is reported killed")
	}
	c.vmCancel()
}

// clockSyncInterval is how often the guest clock is set from the host's.
const clockSyncInterval = time.Minute

// syncClock keeps the guest's wall clock on the host's: under emulation the
// guest clock drifts, and after the host sleeps it lags by the sleep.
func (c *container) syncClock() {
	t := time.NewTicker(clockSyncInterval)
	defer t.Stop()
	for {
		select {
		case <-c.vmCtx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(c.vmCtx, rpcTimeout)
		if _, err := c.client.SetTime(ctx, &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil && c.vmCtx.Err() == nil {
			log.G(ctx).WithError(err).WithField("container_id", c.id).Debug("sync guest clock")
		}
		cancel()
	}
}

// watchEvents long-polls the agent's events and forwards OOM kills.
func (c *container) watchEvents() {
	for c.vmCtx.Err() == nil {
		resp, err := c.client.WaitEvents(c.vmCtx, &agent.WaitEventsRequest{})
		if err != nil {
			if c.vmCtx.Err() != nil || errdefs.IsNotImplemented(err) {
				return
			}
			log.G(c.vmCtx).WithError(err).WithField("container_id", c.id).Debug("wait for guest events")
			select {
			case <-c.vmCtx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		for _, e := range resp.GetEvents() {
			if oom := e.GetOom(); oom != nil {
				id := oom.GetContainerId()
				if id == "" {
					id = c.id
				}
				c.events.send(&eventstypes.TaskOOM{ContainerID: id})
			}
		}
	}
}

// ensureKilled stops the VM if the init has not exited killTimeout after a
// SIGKILL: a wedged guest must not keep a container that was killed alive.
// Stopping the VM ends vmCtx, so every process is then reported killed.
func (c *container) ensureKilled() {
	t := time.NewTimer(killTimeout)
	defer t.Stop()
	select {
	case <-c.init.exited:
		return
	case <-c.vmCtx.Done():
		return
	case <-t.C:
	}
	log.G(c.vmCtx).WithField("container_id", c.id).WithField("console", c.machine.ConsoleTail(2048)).
		Warn("the guest did not carry out SIGKILL: stopping the VM")
	ctx, cancel := context.WithTimeout(context.WithoutCancel(c.vmCtx), time.Second)
	defer cancel()
	_ = c.machine.Stop(ctx)
}

// awaitGuestExit asks the agent for p's exit status. When the VM or the
// agent is gone, the answer is 137: everything in the VM died with it.
func (c *container) awaitGuestExit(p *process) (uint32, time.Time) {
	for attempt := 0; ; attempt++ {
		resp, err := c.client.WaitProcess(c.vmCtx, &agent.WaitProcessRequest{ContainerId: c.id, ExecId: p.execID})
		if err == nil {
			// The exit time is the host's: the guest clock is set at boot
			// but drifts under emulation, and containerd's clients compare
			// exit times with their own clock (exited before started).
			// The waiter is parked in WaitProcess all along, so the host
			// learns of the exit within a round trip.
			return resp.GetExitStatus(), time.Now()
		}
		if c.vmCtx.Err() != nil || attempt >= 4 {
			if c.vmCtx.Err() == nil {
				log.G(c.vmCtx).WithError(err).WithField("container_id", c.id).WithField("exec_id", p.execID).
					Error("cannot learn the exit status from the guest: reporting the process killed")
			}
			return exitKilled, time.Now()
		}
		select {
		case <-c.vmCtx.Done():
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		}
	}
}

// waitExit is the one goroutine per process that turns its guest exit into
// TaskExit: output first (bounded), then, for the init, every exec's exit
// and a last stats snapshot, then the event.
func (c *container) waitExit(p *process) {
	status, at := c.awaitGuestExit(p)
	if p.pio != nil && !p.pio.wait(ioDrainTimeout) {
		log.G(c.vmCtx).WithField("container_id", c.id).WithField("exec_id", p.execID).
			Warn("output still open after the process exited (a child holds it?): cut")
	}
	if p.execID == "" {
		c.afterInitExit()
	}
	p.setExited(status, at)
}

// afterInitExit runs between the init's exit and its TaskExit: it kills
// what is left in the container (as runc does when the PID namespace is not
// shared), waits for the execs' exits to be published (bounded, then forces
// them) and snapshots the stats.
func (c *container) afterInitExit() {
	if c.vmCtx.Err() == nil {
		ctx, cancel := context.WithTimeout(c.vmCtx, rpcTimeout)
		if _, err := c.client.SignalProcess(ctx, &agent.SignalProcessRequest{ContainerId: c.id, Signal: uint32(syscall.SIGKILL), All: true}); err != nil &&
			!errdefs.IsNotFound(err) && c.vmCtx.Err() == nil {
			log.G(ctx).WithError(err).WithField("container_id", c.id).Debug("kill remaining processes")
		}
		cancel()
	}
	deadline := time.NewTimer(execExitTimeout)
	defer deadline.Stop()
	for _, e := range c.execList() {
		select {
		case <-e.exited:
		case <-deadline.C:
		}
		if !e.isExited() {
			log.G(c.vmCtx).WithField("container_id", c.id).WithField("exec_id", e.execID).
				Warn("exec still running after the init exited: reporting it killed")
			e.setExited(exitKilled, time.Now())
		}
	}
	if c.vmCtx.Err() == nil {
		ctx, cancel := context.WithTimeout(c.vmCtx, rpcTimeout)
		if resp, err := c.client.Stats(ctx, &agent.StatsRequest{ContainerId: c.id}); err == nil && resp.GetMetrics() != nil {
			c.mu.Lock()
			c.stats = resp.GetMetrics()
			c.mu.Unlock()
		}
		cancel()
	}
}

// recordInitExit persists the init's exit in the bundle for the delete
// action. Called with the init's lock held; it takes c.mu (lock order:
// process, then container).
func (c *container) recordInitExit(pid uint32, e exitRecord) {
	c.mu.Lock()
	c.state.Exit = &bundleExit{Pid: pid, Status: e.status, ExitedAt: e.at}
	st := c.state
	c.mu.Unlock()
	if err := writeBundleState(c.bundle, &st); err != nil {
		log.G(c.vmCtx).WithError(err).WithField("container_id", c.id).Warn("record exit status in bundle")
	}
}

func (c *container) execList() []*process {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*process, 0, len(c.execs))
	for _, e := range c.execs {
		if e != nil { // nil: an ID reserved while its Exec is in flight
			out = append(out, e)
		}
	}
	return out
}

// process finds the init (execID "") or an exec.
func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok || p == nil {
		return nil, fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// exec creates an exec process in the guest, stopped before its program.
func (c *container) exec(ctx context.Context, execID string, procJSON []byte, stdio stdioSpec) error {
	switch st := c.init.currentState(); st {
	case stateStopped, stateDeleted:
		return fmt.Errorf("cannot exec in container %s: its init process is %s: %w", c.id, st, errdefs.ErrFailedPrecondition)
	}
	c.mu.Lock()
	if _, ok := c.execs[execID]; ok {
		c.mu.Unlock()
		return fmt.Errorf("exec %s in container %s: %w", execID, c.id, errdefs.ErrAlreadyExists)
	}
	// Reserve the ID while the RPC runs.
	c.execs[execID] = nil
	c.mu.Unlock()
	var p *process
	defer func() {
		c.mu.Lock()
		if p == nil {
			delete(c.execs, execID)
		} else {
			c.execs[execID] = p
		}
		c.mu.Unlock()
	}()

	pio, err := newProcessIO(ctx, c.client, c.streamPrefix(execID), stdio, c.id, c.namespace)
	if err != nil {
		return err
	}
	if _, err := c.client.ExecProcess(ctx, &agent.ExecProcessRequest{
		ContainerId: c.id, ExecId: execID, Process: procJSON, Stdio: pio.names,
	}); err != nil {
		pio.close()
		return fmt.Errorf("exec %s: %w", execID, err)
	}
	p = newProcess(c, execID, stdio, pio, 0)
	c.events.send(&eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: execID})
	go c.waitExit(p)
	return nil
}

// deleteExec forgets an exited (or never started) exec.
func (c *container) deleteExec(ctx context.Context, p *process) (*taskAPI.DeleteResponse, error) {
	if err := p.transition(evDelete); err != nil {
		return nil, err
	}
	if c.vmCtx.Err() == nil {
		if _, err := c.client.DeleteProcess(ctx, &agent.DeleteProcessRequest{ContainerId: c.id, ExecId: p.execID}); err != nil &&
			!errdefs.IsNotFound(err) && c.vmCtx.Err() == nil {
			log.G(ctx).WithError(err).WithField("container_id", c.id).WithField("exec_id", p.execID).Warn("delete exec in guest")
		}
	}
	if !p.isExited() {
		// Never started: it will never report an exit of its own.
		p.mu.Lock()
		p.exitedAt = time.Now()
		p.mu.Unlock()
	}
	if p.pio != nil {
		p.pio.close()
	}
	c.mu.Lock()
	delete(c.execs, p.execID)
	c.mu.Unlock()
	pid, status, at := p.exitInfo()
	return &taskAPI.DeleteResponse{Pid: pid, ExitStatus: status, ExitedAt: toTimestamp(at)}, nil
}

// deleteInit tears the container and its VM down after the init exited (or
// was never started, in which case it is killed first).
func (c *container) deleteInit(ctx context.Context) (*taskAPI.DeleteResponse, error) {
	p := c.init
	if st := p.currentState(); st == stateCreated {
		if c.vmCtx.Err() == nil {
			kctx, cancel := context.WithTimeout(ctx, rpcTimeout)
			_, _ = c.client.SignalProcess(kctx, &agent.SignalProcessRequest{ContainerId: c.id, Signal: uint32(syscall.SIGKILL)})
			cancel()
		}
		select {
		case <-p.exited:
		case <-time.After(ioDrainTimeout):
			p.setExited(exitKilled, time.Now())
		}
	}
	if err := p.transition(evDelete); err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.deleted = true
	c.mu.Unlock()
	c.destroy(ctx)
	pid, status, at := p.exitInfo()
	c.events.send(&eventstypes.TaskDelete{ContainerID: c.id, ID: c.id, Pid: pid, ExitStatus: status, ExitedAt: toTimestamp(at)})
	return &taskAPI.DeleteResponse{Pid: pid, ExitStatus: status, ExitedAt: toTimestamp(at)}, nil
}

// destroy stops the VM and releases the host resources: the agent is asked
// to power off cleanly (so shares are flushed), then the VM is stopped, the
// poststop hooks run, and the rootfs is unmounted. Each step is bounded and
// best-effort: a half-created or crashed container goes through it too.
func (c *container) destroy(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	logger := log.G(ctx).WithField("container_id", c.id)
	select {
	case <-c.tearingDown:
	default:
		close(c.tearingDown)
	}
	// Without a guest that agreed to power off, waiting for the VM to exit
	// by itself is pointless: it is killed at once.
	poweringOff := false
	if c.client != nil && c.vmCtx.Err() == nil {
		sctx, cancel := context.WithTimeout(ctx, teardownTimeout)
		if _, err := c.client.DeleteContainer(sctx, &agent.DeleteContainerRequest{ContainerId: c.id}); err != nil && !errdefs.IsNotFound(err) {
			logger.WithError(err).Debug("delete container in guest")
		}
		_, err := c.client.Shutdown(sctx, &emptypb.Empty{})
		if err != nil {
			logger.WithError(err).Debug("guest shutdown")
		}
		// A connection that closes under the call is a guest powering off.
		poweringOff = err == nil || errdefs.IsUnavailable(err)
		cancel()
		logger.Debug("guest shut down")
	}
	if c.machine != nil {
		wait := time.Duration(0)
		if poweringOff {
			wait = teardownTimeout
		}
		sctx, cancel := context.WithTimeout(ctx, wait)
		if err := c.machine.Stop(sctx); err != nil {
			logger.WithError(err).Warn("stop VM")
		}
		cancel()
		logger.Debug("VM stopped")
	}
	if c.client != nil {
		c.client.Close()
	}
	c.vmCancel()
	if c.init != nil && c.init.pio != nil {
		c.init.pio.close()
	}
	for _, e := range c.execList() {
		if e.pio != nil {
			e.pio.close()
		}
	}
	// The init's exit handler records the exit in the bundle: let it finish
	// so that nothing writes there after teardown. It returns promptly now
	// that the VM context has ended; the bound covers a Start still in flight.
	if c.init != nil {
		select {
		case <-c.init.exited:
		case <-time.After(teardownTimeout):
			logger.Warn("the init's exit was not recorded before teardown")
		}
	}
	if c.spec.Hooks != nil && len(c.spec.Hooks.Poststop) > 0 {
		// Poststop failures are warnings in the OCI spec: the container is
		// gone whatever the hook says.
		if err := runHooks(ctx, "poststop", c.spec.Hooks.Poststop, c.ociState(specs.StateStopped)); err != nil {
			logger.WithError(err).Warn("poststop hook")
		}
	}
	if c.rootfs != "" {
		if err := mount.UnmountRecursive(c.rootfs, 0); err != nil {
			logger.WithError(err).Warn("unmount rootfs")
		}
	}
	if c.stateDir != "" {
		if err := os.RemoveAll(c.stateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
			logger.WithError(err).Warn("remove VM state dir")
		}
	}
}

func toTimestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}
