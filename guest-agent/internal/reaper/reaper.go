// Package reaper is the agent's only waiter for child processes.
//
// The agent is PID 1 in the VM, so every orphan in the guest is reparented to
// it and must be reaped, or zombies pile up. One goroutine turns SIGCHLD into a
// wait4(-1, WNOHANG) loop and dispatches each exit to whoever registered the
// pid. Nothing else in the agent may wait for children (no exec.Cmd.Wait): a
// second waiter would steal exits from the first.
//
// A child must never be reaped between its fork and the registration of its
// pid ("subscribe before start"): its exit would be taken for an orphan's, and
// once reaped its pid could be reused. The fork itself must not run under the
// reaper's lock either: it can block for as long as the child does not reach
// execve (a vfork-style clone into a frozen cgroup blocks until the thaw, and
// under a loaded TCG host a fork+exec of the agent takes a long time), and
// every exit in the guest would wait for it, along with every later Start.
// So while any Start is in flight the wait loop reaps registered pids only,
// one wait4(pid) each; unregistered zombies (orphans, and the child being
// started) are left alone, which also keeps their pids from being reused, and
// are collected once no Start is in flight. Exits of pids that nobody
// registered (orphans, or a pid registered late through Register) are kept in
// a bounded table so a late Register still gets its status.
package reaper

import (
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// maxUnclaimed bounds the table of exits nobody registered; orphans of a busy
// container would otherwise grow it forever. The oldest entries go first.
const maxUnclaimed = 4096

// Exit is the end of one process.
type Exit struct {
	Pid    int
	Status unix.WaitStatus
	At     time.Time
}

// ExitStatus is the status a shell would report: the exit code, or 128+signal
// for a process killed by a signal.
func (e Exit) ExitStatus() uint32 {
	return ExitStatus(e.Status)
}

// ExitStatus maps a wait status to the conventional exit status: the code for
// a normal exit, 128+signal for a killed process.
func ExitStatus(ws unix.WaitStatus) uint32 {
	switch {
	case ws.Exited():
		return uint32(ws.ExitStatus())
	case ws.Signaled():
		return 128 + uint32(ws.Signal())
	default:
		// Stopped or continued states are never dispatched as exits; be
		// explicit rather than return a misleading 0.
		return 255
	}
}

// Reaper reaps every child of the process and dispatches exits.
type Reaper struct {
	// mu guards waiters, unclaimed, order and starting, and is held across
	// every wait4 batch (never across a fork: see the package doc).
	mu        sync.Mutex
	waiters   map[int]chan Exit
	unclaimed map[int]Exit
	// order is the arrival order of unclaimed pids, for eviction.
	order []int
	// starting counts the Starts whose child may exist unregistered; while
	// it is non-zero only registered pids are reaped.
	starting int

	// wait4 is replaceable in tests; it has the signature of unix.Wait4.
	wait4 func(pid int, ws *unix.WaitStatus, options int, ru *unix.Rusage) (int, error)
	now   func() time.Time
}

// New returns a Reaper that is not yet running; call Run to start reaping.
func New() *Reaper {
	return &Reaper{
		waiters:   make(map[int]chan Exit),
		unclaimed: make(map[int]Exit),
		wait4:     unix.Wait4,
		now:       time.Now,
	}
}

// Run reaps on every SIGCHLD until stop is closed. It reaps once at start in
// case children exited before the signal handler was installed.
func (r *Reaper) Run(stop <-chan struct{}) {
	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, syscall.SIGCHLD)
	defer signal.Stop(sigs)
	r.Reap()
	// A periodic sweep covers coalesced or lost signals; SIGCHLD is not queued.
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-sigs:
		case <-tick.C:
		}
		r.Reap()
	}
}

// Reap collects every child that has exited so far and dispatches it (only
// the registered ones while a Start is in flight).
func (r *Reaper) Reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reapLocked()
}

func (r *Reaper) reapLocked() {
	if r.starting > 0 {
		r.reapRegisteredLocked()
		return
	}
	for {
		var ws unix.WaitStatus
		pid, err := r.wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			// ECHILD: no children at all; 0: none exited yet.
			return
		}
		r.dispatchLocked(Exit{Pid: pid, Status: ws, At: r.now()})
	}
}

// reapRegisteredLocked collects the registered pids that have exited,
// leaving every other zombie for a later full reap.
func (r *Reaper) reapRegisteredLocked() {
	for want := range r.waiters {
		var ws unix.WaitStatus
		pid, err := r.wait4(want, &ws, unix.WNOHANG, nil)
		for errors.Is(err, unix.EINTR) {
			pid, err = r.wait4(want, &ws, unix.WNOHANG, nil)
		}
		if err != nil || pid != want {
			continue
		}
		// Deleting the entry being visited is allowed in a range.
		r.dispatchLocked(Exit{Pid: pid, Status: ws, At: r.now()})
	}
}

func (r *Reaper) dispatchLocked(e Exit) {
	if ch, ok := r.waiters[e.Pid]; ok {
		delete(r.waiters, e.Pid)
		ch <- e // buffered with room for exactly this exit
		close(ch)
		return
	}
	if _, dup := r.unclaimed[e.Pid]; !dup {
		r.order = append(r.order, e.Pid)
	}
	r.unclaimed[e.Pid] = e
	for len(r.unclaimed) > maxUnclaimed && len(r.order) > 0 {
		old := r.order[0]
		r.order = r.order[1:]
		delete(r.unclaimed, old)
	}
}

// Start runs start (which forks a child and returns its pid) with the
// reaping of unregistered pids held off, and registers the pid before its
// exit can be collected. Reaping of registered pids, and other Starts, go on
// while start runs. The returned channel receives the child's exit once,
// then is closed.
func (r *Reaper) Start(start func() (int, error)) (int, <-chan Exit, error) {
	r.mu.Lock()
	r.starting++
	r.mu.Unlock()
	pid, err := start()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.starting--
	if err != nil {
		// Orphans held back meanwhile are collected now.
		r.reapLocked()
		return 0, nil, err
	}
	// No unregistered pid was reaped since this Start began and the child
	// holds its pid (alive, or a zombie not yet reaped), so any unclaimed
	// exit under it belongs to an earlier process with the same pid.
	r.forgetUnclaimedLocked(pid)
	ch := make(chan Exit, 1)
	r.waiters[pid] = ch
	// The child may have exited already (its SIGCHLD found it unregistered),
	// and orphans may have been held back: collect them now.
	r.reapLocked()
	return pid, ch, nil
}

// Register asks for the exit of a pid that was started elsewhere. If it was
// already reaped the exit is delivered at once.
func (r *Reaper) Register(pid int) <-chan Exit {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch := make(chan Exit, 1)
	if e, ok := r.unclaimed[pid]; ok {
		r.forgetUnclaimedLocked(pid)
		ch <- e
		close(ch)
		return ch
	}
	r.waiters[pid] = ch
	return ch
}

func (r *Reaper) forgetUnclaimedLocked(pid int) {
	if _, ok := r.unclaimed[pid]; !ok {
		return
	}
	delete(r.unclaimed, pid)
	for i, p := range r.order {
		if p == pid {
			r.order = append(r.order[:i], r.order[i+1:]...)
			break
		}
	}
}

// Unclaimed reports how many exits nobody has asked for (for tests and
// diagnostics).
func (r *Reaper) Unclaimed() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.unclaimed)
}
