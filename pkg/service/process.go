package service

import (
	"context"
	"fmt"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// exitKilled is what a process reports when the VM or the agent is lost
// under it: everything in the VM died as if by SIGKILL.
const exitKilled = 128 + 9

// process is the init process or one exec of a container, as the shim
// tracks it. The shim's record is the truth for containerd: it outlives the
// guest process (and the VM, if it crashes) until Delete.
type process struct {
	c *container
	// execID is empty for the init process.
	execID string
	stdio  stdioSpec
	pio    *processIO

	// mu guards every field below.
	mu    sync.Mutex
	state procState
	pid   uint32
	// starting is set while StartProcess is in flight; an exit reported
	// meanwhile is parked in pending so that TaskStart is queued first.
	starting   bool
	pending    *exitRecord
	exitStatus uint32
	exitedAt   time.Time
	// exited is closed once the exit is recorded and its TaskExit queued.
	exited chan struct{}
}

type exitRecord struct {
	status uint32
	at     time.Time
}

func newProcess(c *container, execID string, stdio stdioSpec, pio *processIO, pid uint32) *process {
	return &process{c: c, execID: execID, stdio: stdio, pio: pio, pid: pid, exited: make(chan struct{})}
}

// id is the process's name in events: the container ID for the init.
func (p *process) id() string {
	if p.execID == "" {
		return p.c.id
	}
	return p.execID
}

// start lets the created process run and queues TaskStart or
// TaskExecStarted. The state check and the event are both under p.mu, and
// an exit reported while the RPC is in flight waits in p.pending until
// after the start event: TaskStart always precedes TaskExit.
func (p *process) start(ctx context.Context) (uint32, error) {
	p.mu.Lock()
	if _, err := p.state.next(evStart); err != nil {
		p.mu.Unlock()
		return 0, err
	}
	if p.starting {
		p.mu.Unlock()
		return 0, fmt.Errorf("process %s is already starting: %w", p.id(), errdefs.ErrFailedPrecondition)
	}
	p.starting = true
	p.mu.Unlock()
	if p.pio != nil {
		p.pio.startStdin()
	}

	resp, err := p.c.sb.client.StartProcess(ctx, &agent.StartProcessRequest{ContainerId: p.c.id, ExecId: p.execID})

	p.mu.Lock()
	defer p.mu.Unlock()
	p.starting = false
	if err != nil {
		if p.pending != nil {
			p.recordExitLocked(*p.pending)
		}
		return 0, fmt.Errorf("start %s: %w", p.id(), err)
	}
	p.state, _ = p.state.next(evStart)
	if resp.GetPid() != 0 {
		p.pid = resp.GetPid()
	}
	if p.execID == "" {
		p.c.events.send(&eventstypes.TaskStart{ContainerID: p.c.id, Pid: p.pid})
	} else {
		p.c.events.send(&eventstypes.TaskExecStarted{ContainerID: p.c.id, ExecID: p.execID, Pid: p.pid})
	}
	if p.pending != nil {
		p.recordExitLocked(*p.pending)
	}
	return p.pid, nil
}

// setExited records the process's exit and queues TaskExit, unless Start is
// in flight (then Start does it right after TaskStart). Duplicate exits (a
// forced exit after VM loss, then the waiter's own) are ignored.
func (p *process) setExited(status uint32, at time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.starting {
		if p.pending == nil {
			p.pending = &exitRecord{status, at}
		}
		return
	}
	p.recordExitLocked(exitRecord{status, at})
}

func (p *process) recordExitLocked(e exitRecord) {
	next, err := p.state.next(evExit)
	if err != nil {
		return // already stopped or deleted: a duplicate
	}
	p.state = next
	p.pending = nil
	p.exitStatus = e.status
	p.exitedAt = e.at
	if p.execID == "" {
		p.c.recordInitExit(p.pid, e)
	}
	p.c.events.send(&eventstypes.TaskExit{
		ContainerID: p.c.id,
		ID:          p.id(),
		Pid:         p.pid,
		ExitStatus:  e.status,
		ExitedAt:    protobuf.ToTimestamp(e.at),
	})
	close(p.exited)
}

// transition moves the process through ev, for pause, resume and delete.
func (p *process) transition(ev procEvent) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	next, err := p.state.next(ev)
	if err != nil {
		return fmt.Errorf("%s: %w", p.id(), err)
	}
	p.state = next
	return nil
}

func (p *process) currentState() procState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}

// isExited reports whether the exit has been recorded.
func (p *process) isExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// wait blocks until the process has exited or ctx ends.
func (p *process) wait(ctx context.Context) (*taskAPI.WaitResponse, error) {
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return &taskAPI.WaitResponse{ExitStatus: p.exitStatus, ExitedAt: protobuf.ToTimestamp(p.exitedAt)}, nil
}

func (p *process) stateResponse(bundle string) *taskAPI.StateResponse {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := &taskAPI.StateResponse{
		ID:       p.id(),
		Bundle:   bundle,
		Pid:      p.pid,
		Status:   p.state.status(),
		Stdin:    p.stdio.stdin,
		Stdout:   p.stdio.stdout,
		Stderr:   p.stdio.stderr,
		Terminal: p.stdio.terminal,
		ExecID:   p.execID,
	}
	if p.state == stateStopped || p.state == stateDeleted {
		r.ExitStatus = p.exitStatus
		r.ExitedAt = protobuf.ToTimestamp(p.exitedAt)
	}
	return r
}

func (p *process) exitInfo() (pid, status uint32, at time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid, p.exitStatus, p.exitedAt
}
