package service

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
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

// container is one container of the pod: its spec, files, processes and
// bundle record. The VM it runs in is its sandbox, shared with the pod's
// other containers.
type container struct {
	id        string
	bundle    string
	namespace string
	// spec is the OCI spec as containerd wrote it (host paths, hooks).
	spec   *specs.Spec
	sb     *sandbox
	events *eventQueue
	init   *process
	// files are the container's host mounts in the pod share and the
	// spec the guest got.
	files *containerFiles

	// mu guards execs, stats, state and deleted.
	mu    sync.Mutex
	execs map[string]*process
	// stats is the last metrics read from the guest, kept so that Stats
	// keeps answering after the init exited (CRI reads OOM kills then).
	stats *stats.Metrics
	// earlyHooks is set once the prestart/createRuntime hooks ran before
	// the VM booted (they filled the pod's new network namespace).
	earlyHooks bool
	// state is the bundle record, rewritten when the init exits.
	state   bundleState
	deleted bool
}

// ociState is the state JSON hooks get on stdin. The pid is the
// hypervisor's: the only process on the host that lives exactly as long as
// the VM.
func (c *container) ociState(status specs.ContainerState) specs.State {
	pid := 0
	if c.sb != nil && c.sb.machine != nil {
		pid = c.sb.machine.Pid()
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

// recordVM writes the bundle record the delete action needs after a crash:
// the VM, its state directory and this container's host mounts.
func (c *container) recordVM() error {
	c.mu.Lock()
	if c.sb.machine != nil {
		c.state.VMPid = c.sb.machine.Pid()
		c.state.VMPoolDir = vm.PoolDirOf(c.sb.machine)
	}
	c.state.VMStateDir = c.sb.stateDir
	c.state.Share = c.files.hostDir
	c.state.Rootfs = c.files.rootfsMount
	st := c.state
	c.mu.Unlock()
	if err := writeBundleState(c.bundle, &st); err != nil {
		return fmt.Errorf("record VM in bundle: %w", err)
	}
	return nil
}

// createInVM creates the container in the booted VM: the init process,
// stopped before its program, then the host's create hooks. On error the
// caller's cleanup (c.destroy) undoes it.
func (c *container) createInVM(ctx context.Context, stdio stdioSpec) error {
	if err := c.recordVM(); err != nil {
		return err
	}
	client := c.sb.client
	// containerd's Create carries no deadline (ctr run waits forever), so
	// the agent RPCs of the create are bounded here: a guest that stops
	// answering (a stuck module load or 9p mount, a lost stream) fails the
	// create with its console instead of hanging it. The ttrpc deadline
	// also reaches the agent, whose own waits then end too.
	cctx, cancel := context.WithTimeout(ctx, createTimeout)
	defer cancel()
	done := timed(ctx, c.id, "stdio streams")
	pio, err := newProcessIO(ctx, client, c.sb.streamPrefix(""), stdio, c.id, c.namespace)
	if err != nil {
		return err
	}
	done()
	specJSON, err := json.Marshal(c.files.gspec)
	if err != nil {
		pio.close()
		return err
	}
	done = timed(ctx, c.id, "CreateContainer RPC")
	resp, err := client.CreateContainer(cctx, &agent.CreateContainerRequest{
		ContainerId:  c.id,
		Spec:         specJSON,
		Rootfs:       c.files.rootfs,
		BlockDevices: c.files.devices,
		Stdio:        pio.names,
	})
	if err != nil {
		pio.close()
		return c.sb.guestError("create container in VM", err)
	}
	done()
	c.init = newProcess(c, "", stdio, pio, resp.GetPid())
	// The exit is waited for from now on: a process killed before Start, or
	// a VM that dies, is still reported.
	go c.waitExit(c.init)

	if c.spec.Hooks != nil {
		h := c.spec.Hooks
		//nolint:staticcheck // Prestart is deprecated but still what older clients set.
		for _, hs := range []struct {
			kind  string
			hooks []specs.Hook
		}{{"prestart", h.Prestart}, {"createRuntime", h.CreateRuntime}, {"createContainer", h.CreateContainer}} {
			if c.earlyHooks && hs.kind != "createContainer" {
				continue // they ran before the VM booted (runEarlyHooks)
			}
			if err := runHooks(ctx, hs.kind, hs.hooks, c.ociState(specs.StateCreating)); err != nil {
				return err
			}
		}
	}
	return nil
}

// ensureKilled stops the VM if the init has not exited killTimeout after a
// SIGKILL: a wedged guest must not keep a container that was killed alive.
// Stopping the VM ends vmCtx, so every process of the pod is then reported
// killed: a guest that ignores SIGKILL is beyond saving anyway.
func (c *container) ensureKilled() {
	t := time.NewTimer(killTimeout)
	defer t.Stop()
	select {
	case <-c.init.exited:
		return
	case <-c.sb.vmCtx.Done():
		return
	case <-t.C:
	}
	log.G(c.sb.vmCtx).WithField("container_id", c.id).WithField("console", c.sb.machine.ConsoleTail(2048)).
		Warn("the guest did not carry out SIGKILL: stopping the VM (and the pod with it)")
	c.sb.stopVM()
}

// awaitGuestExit asks the agent for p's exit status, and for an init the
// cgroup's stats as the exit left them (nil if the agent sent none). When
// the VM or the agent is gone, the answer is 137: everything in the VM
// died with it.
func (c *container) awaitGuestExit(p *process) (uint32, time.Time, *stats.Metrics) {
	for attempt := 0; ; attempt++ {
		resp, err := c.sb.client.WaitProcess(c.sb.vmCtx, &agent.WaitProcessRequest{ContainerId: c.id, ExecId: p.execID})
		if err == nil {
			// The exit time is the host's: the guest clock is set at boot
			// but drifts under emulation, and containerd's clients compare
			// exit times with their own clock (exited before started).
			// The waiter is parked in WaitProcess all along, so the host
			// learns of the exit within a round trip.
			return resp.GetExitStatus(), time.Now(), resp.GetMetrics()
		}
		if c.sb.vmCtx.Err() != nil || attempt >= 4 {
			if c.sb.vmCtx.Err() == nil {
				log.G(c.sb.vmCtx).WithError(err).WithField("container_id", c.id).WithField("exec_id", p.execID).
					Error("cannot learn the exit status from the guest: reporting the process killed")
			}
			return exitKilled, time.Now(), nil
		}
		select {
		case <-c.sb.vmCtx.Done():
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		}
	}
}

// waitExit is the one goroutine per process that turns its guest exit into
// TaskExit: output first (bounded), then, for the init, every exec's exit
// and a last stats snapshot, then the event.
func (c *container) waitExit(p *process) {
	status, at, metrics := c.awaitGuestExit(p)
	if p.pio != nil && !p.pio.wait(ioDrainTimeout) {
		log.G(c.sb.vmCtx).WithField("container_id", c.id).WithField("exec_id", p.execID).
			Warn("output still open after the process exited (a child holds it?): cut")
	}
	if p.execID == "" {
		c.afterInitExit(metrics)
	}
	p.setExited(status, at)
}

// afterInitExit runs between the init's exit and its TaskExit: it kills
// what is left in the container (as runc does when the PID namespace is not
// shared), waits for the execs' exits to be published (bounded, then forces
// them) and keeps the stats: exitStats, which the agent sent with the exit,
// or else a snapshot asked for now (one more round trip to the guest).
func (c *container) afterInitExit(exitStats *stats.Metrics) {
	if c.sb.vmCtx.Err() == nil && !c.ownPIDNamespace() {
		ctx, cancel := context.WithTimeout(c.sb.vmCtx, rpcTimeout)
		if _, err := c.sb.client.SignalProcess(ctx, &agent.SignalProcessRequest{ContainerId: c.id, Signal: uint32(syscall.SIGKILL), All: true}); err != nil &&
			!errdefs.IsNotFound(err) && c.sb.vmCtx.Err() == nil {
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
			log.G(c.sb.vmCtx).WithField("container_id", c.id).WithField("exec_id", e.execID).
				Warn("exec still running after the init exited: reporting it killed")
			e.setExited(exitKilled, time.Now())
		}
	}
	if exitStats == nil && c.sb.vmCtx.Err() == nil {
		ctx, cancel := context.WithTimeout(c.sb.vmCtx, rpcTimeout)
		if resp, err := c.sb.client.Stats(ctx, &agent.StatsRequest{ContainerId: c.id}); err == nil {
			exitStats = resp.GetMetrics()
		}
		cancel()
	}
	if exitStats != nil {
		c.mu.Lock()
		c.stats = exitStats
		c.mu.Unlock()
	}
}

// ownPIDNamespace tells whether the container's init was PID 1 of a PID
// namespace of its own in the guest: the guest kernel then killed (and
// reaped) everything else in it before the init's exit was reported, and
// the kill of what is left would be one more round trip to the guest
// before TaskExit for nothing.
func (c *container) ownPIDNamespace() bool {
	if c.files == nil || c.files.gspec == nil || c.files.gspec.Linux == nil {
		return false
	}
	for _, ns := range c.files.gspec.Linux.Namespaces {
		if ns.Type == specs.PIDNamespace {
			return ns.Path == ""
		}
	}
	return false
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
		log.G(c.sb.vmCtx).WithError(err).WithField("container_id", c.id).Warn("record exit status in bundle")
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

	pio, err := newProcessIO(ctx, c.sb.client, c.sb.streamPrefix(execID), stdio, c.id, c.namespace)
	if err != nil {
		return err
	}
	if _, err := c.sb.client.ExecProcess(ctx, &agent.ExecProcessRequest{
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
	if c.sb.vmCtx.Err() == nil {
		if _, err := c.sb.client.DeleteProcess(ctx, &agent.DeleteProcessRequest{ContainerId: c.id, ExecId: p.execID}); err != nil &&
			!errdefs.IsNotFound(err) && c.sb.vmCtx.Err() == nil {
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

// deleteInit tears the container down after the init exited (or was never
// started, in which case it is killed first). The VM stays: the service
// stops it once no container is left.
func (c *container) deleteInit(ctx context.Context) (*taskAPI.DeleteResponse, error) {
	p := c.init
	if st := p.currentState(); st == stateCreated {
		if c.sb.alive() {
			kctx, cancel := context.WithTimeout(ctx, rpcTimeout)
			_, _ = c.sb.client.SignalProcess(kctx, &agent.SignalProcessRequest{ContainerId: c.id, Signal: uint32(syscall.SIGKILL)})
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
	c.forgetVM()
	pid, status, at := p.exitInfo()
	c.events.send(&eventstypes.TaskDelete{ContainerID: c.id, ID: c.id, Pid: pid, ExitStatus: status, ExitedAt: toTimestamp(at)})
	return &taskAPI.DeleteResponse{Pid: pid, ExitStatus: status, ExitedAt: toTimestamp(at)}, nil
}

// forgetVM rewrites the bundle record of a deleted container without the
// VM and the host mounts: the delete action containerd runs afterwards
// (it does so whenever its connection for a task closes) must not touch
// the pod's VM, which its siblings still use.
func (c *container) forgetVM() {
	c.mu.Lock()
	c.state.VMPid, c.state.VMStateDir, c.state.VMPoolDir, c.state.Share, c.state.Rootfs = 0, "", "", "", ""
	st := c.state
	c.mu.Unlock()
	if err := writeBundleState(c.bundle, &st); err != nil {
		log.G(c.sb.vmCtx).WithError(err).WithField("container_id", c.id).Warn("update the bundle record")
	}
}

// destroy removes the container from the guest and releases its host
// resources: the agent deletes it (kills what is left, unmounts its root),
// its stdio closes, the poststop hooks run and its host mounts in the pod
// share are undone. Each step is bounded and best-effort: a half-created
// container, or one whose VM crashed, goes through it too. The VM is left
// alone.
func (c *container) destroy(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	logger := log.G(ctx).WithField("container_id", c.id)
	if c.sb.client != nil && c.sb.alive() {
		done := timed(ctx, c.id, "DeleteContainer RPC")
		sctx, cancel := context.WithTimeout(ctx, teardownTimeout)
		if _, err := c.sb.client.DeleteContainer(sctx, &agent.DeleteContainerRequest{ContainerId: c.id}); err != nil && !errdefs.IsNotFound(err) {
			logger.WithError(err).Debug("delete container in guest")
		}
		cancel()
		done()
	}
	if c.init != nil && c.init.pio != nil {
		c.init.pio.close()
	}
	for _, e := range c.execList() {
		if e.pio != nil {
			e.pio.close()
		}
	}
	// The init's exit handler records the exit in the bundle: let it finish
	// so that nothing writes there after teardown. Deleting the container
	// in the guest made it exit; the bound covers a wedged guest.
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
	if c.files != nil {
		defer timed(ctx, c.id, "container host unmounts")()
		if err := c.sb.share.remove(c.id); err != nil {
			logger.WithError(err).Warn("undo the container's host mounts")
		}
	}
}

func toTimestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}
