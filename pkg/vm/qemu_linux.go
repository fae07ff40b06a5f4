package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// DefaultQEMU is the hypervisor binary used when Config.Hypervisor is empty.
const DefaultQEMU = "qemu-system-x86_64"

// consoleTailBytes is how much console output error messages carry.
const consoleTailBytes = 2048

// QEMU runs a VM as a qemu-system process. The agent channel and the QMP
// monitor are socketpairs whose other ends QEMU inherits as fds, so there
// is no socket path to poll for, to clean up, or to overflow sun_path with
// a deep state directory.
type QEMU struct {
	cfg    Config
	binary string
	kvm    bool
	tscKHz int
	// Warm start (template.go): memPath backs guest RAM with a template's
	// memory file, shared while the template is built (memShared), private
	// in a clone; statePath is the saved device state a clone loads
	// instead of booting.
	memPath   string
	memShared bool
	statePath string
	// pooled is set for a VM handed over by the pool daemon
	// (pool_client_linux.go): restored already, not our child.
	pooled bool

	done chan struct{} // closed by the reaper once qemu has exited
	// agentOpen is closed when the guest first opens the agent port
	// (QEMU's VSERPORT_CHANGE event).
	agentOpen     chan struct{}
	agentOpenOnce sync.Once

	mu sync.Mutex // guards everything below
	// started is set by the first Start; a Machine runs once.
	started bool
	// proc is the qemu process: our child, or a pooled VM's pidfd.
	proc        process
	bootStarted time.Time
	qmp         *qmpClient
	agent       net.Conn
	agentGiven  bool   // AgentConn handed agent out: the caller closes it
	killed      string // why we killed qemu, "" if we did not
	shutdown    string // the reason of QEMU's SHUTDOWN event, if any
	err         error  // why the VM exited; final once done is closed
}

var _ Machine = (*QEMU)(nil)

// NewQEMU checks cfg and the host and returns a machine ready to Start.
// It chooses KVM when /dev/kvm is usable and TCG otherwise.
func NewQEMU(cfg Config) (*QEMU, error) {
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("vm %s: no state directory: %w", cfg.ID, errdefs.ErrInvalidArgument)
	}
	for _, p := range []string{cfg.Kernel, cfg.Initrd} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("vm %s: boot file: %w: %w", cfg.ID, errdefs.ErrNotFound, err)
		}
	}
	for i, n := range cfg.NICs {
		if n.File == nil {
			return nil, fmt.Errorf("vm %s: NIC %d (%s) has no file: %w", cfg.ID, i, n.Kind, errdefs.ErrInvalidArgument)
		}
	}
	binary := cfg.Hypervisor
	if binary == "" {
		binary = DefaultQEMU
	}
	path, err := exec.LookPath(binary)
	if err != nil {
		return nil, fmt.Errorf("vm %s: hypervisor %s: %w: %w", cfg.ID, binary, errdefs.ErrNotFound, err)
	}
	q := &QEMU{
		cfg:       cfg,
		binary:    path,
		kvm:       kvmUsable(),
		done:      make(chan struct{}),
		agentOpen: make(chan struct{}),
	}
	if !q.kvm {
		// Under KVM the guest learns its TSC rate from the hypervisor.
		q.tscKHz = HostTSCKHz()
	}
	// Fail now, not in Start, on a Config the command line rejects.
	if _, err := q.args(); err != nil {
		return nil, err
	}
	return q, nil
}

func (q *QEMU) consolePath() string { return filepath.Join(q.cfg.StateDir, "console.log") }
func (q *QEMU) logPath() string     { return filepath.Join(q.cfg.StateDir, "qemu.log") }

// The child's fds for the two socketpairs (ExtraFiles start at 3), and a
// clone's template state.
const (
	childQMPFD   = 3
	childAgentFD = 4
	childStateFD = 5
)

// nicFDs are the child's fds of the NICs' files, after the sockets and
// the template state's place.
func nicFDs(n int) []int {
	fds := make([]int, n)
	for i := range fds {
		fds[i] = childStateFD + 1 + i
	}
	return fds
}

func (q *QEMU) args() ([]string, error) {
	return qemuArgs(q.cfg, qemuOptions{
		Arch:        runtime.GOARCH,
		KVM:         q.kvm,
		TSCKHz:      q.tscKHz,
		ConsolePath: q.consolePath(),
		QMPFD:       childQMPFD,
		AgentFD:     childAgentFD,
		NICFDs:      nicFDs(len(q.cfg.NICs)),
		Paused:      true,
		MemPath:     q.memPath,
		MemShared:   q.memShared,
		Incoming:    q.statePath != "",
	})
}

// StartMode is StartTemplate for a clone restored from a template,
// StartPool for one handed over by the pool daemon.
func (q *QEMU) StartMode() StartMode {
	if q.pooled {
		return StartPool
	}
	if q.statePath != "" {
		return StartTemplate
	}
	return StartCold
}

// Start launches qemu paused, sets up QMP, then lets the guest run. It
// returns once the guest CPUs run; on failure qemu is gone.
func (q *QEMU) Start(ctx context.Context) (retErr error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.started {
		return fmt.Errorf("vm %s: already started: %w", q.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	q.started = true
	args, err := q.args()
	if err != nil {
		return q.failEarly(err)
	}

	qmpHost, qmpChild, err := socketpair()
	if err != nil {
		return q.failEarly(err)
	}
	agentHost, agentChild, err := socketpair()
	if err != nil {
		qmpHost.Close()
		qmpChild.Close()
		return q.failEarly(err)
	}
	closeAll := func() {
		qmpHost.Close()
		qmpChild.Close()
		agentHost.Close()
		agentChild.Close()
	}
	extra := []*os.File{qmpChild, agentChild} // fds 3 and 4
	if q.statePath != "" {
		state, err := os.Open(q.statePath)
		if err != nil {
			closeAll()
			return q.failEarly(fmt.Errorf("vm %s: template state: %w", q.cfg.ID, err))
		}
		defer state.Close()
		extra = append(extra, state) // fd 5
	}
	log, err := os.OpenFile(q.logPath(), os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		closeAll()
		return q.failEarly(fmt.Errorf("vm %s: %w", q.cfg.ID, err))
	}

	cmd := exec.Command(q.binary, args...)
	cmd.Dir = q.cfg.StateDir
	cmd.Env = qemuEnv()
	cmd.Stdout = log
	cmd.Stderr = log
	if len(q.cfg.NICs) > 0 {
		if len(extra) == 2 {
			extra = append(extra, nil) // fd 5 (the template state) stays closed
		}
		for _, n := range q.cfg.NICs {
			extra = append(extra, n.File) // fds 6...
		}
	}
	cmd.ExtraFiles = extra
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// A shim killed without cleanup must not leave qemu spinning.
		Pdeathsig: syscall.SIGKILL,
		// Keep terminal signals meant for the caller off the VM.
		Setpgid: true,
	}
	q.bootStarted = time.Now()
	// Pdeathsig fires when the *thread* that forked exits. A fresh
	// goroutine is never locked to its thread, so the runtime keeps that
	// thread; the caller's goroutine might be locked (e.g. while it
	// switches namespaces) and its thread discarded later.
	startErr := make(chan error, 1)
	noHugePages()
	go func() { startErr <- cmd.Start() }()
	err = <-startErr
	log.Close()
	qmpChild.Close()
	agentChild.Close()
	if err != nil {
		qmpHost.Close()
		agentHost.Close()
		return q.failEarly(fmt.Errorf("vm %s: starting %s: %w", q.cfg.ID, q.binary, err))
	}
	q.attach(childProcess{cmd}, agentHost, qmpHost)
	defer q.undoFailedStart(&retErr)
	// QMP replies come from the reader goroutine, which takes no lock
	// but q.mu for events; make the round trips without holding it.
	q.mu.Unlock()
	err = q.qmp.handshake(ctx)
	if err == nil && q.statePath != "" {
		err = q.restore(ctx)
	}
	if err == nil {
		_, err = q.qmp.execute(ctx, "cont", nil)
	}
	q.mu.Lock()
	if err != nil {
		return fmt.Errorf("vm %s: qemu did not come up: %w", q.cfg.ID, err)
	}
	if q.statePath != "" {
		// The template was saved with the agent's port open, so no
		// VSERPORT_CHANGE comes: the agent is there.
		q.agentOpenOnce.Do(func() { close(q.agentOpen) })
	}
	return nil
}

// onEvent runs on the QMP reader goroutine.
func (q *QEMU) onEvent(name string, data json.RawMessage) {
	switch name {
	case "VSERPORT_CHANGE":
		var ev struct {
			ID   string `json:"id"`
			Open bool   `json:"open"`
		}
		if json.Unmarshal(data, &ev) == nil && ev.ID == agentPortID && ev.Open {
			q.agentOpenOnce.Do(func() { close(q.agentOpen) })
		}
	case "SHUTDOWN":
		var ev struct {
			Reason string `json:"reason"`
		}
		_ = json.Unmarshal(data, &ev)
		q.mu.Lock()
		q.shutdown = ev.Reason
		q.mu.Unlock()
	}
}

// reap is the only caller of Wait. It decides Err and closes done.
func (q *QEMU) reap() {
	waitErr := q.proc.wait()
	// QEMU sends SHUTDOWN just before it exits; its end of the monitor is
	// closed now, so the reader drains what is left and stops promptly.
	select {
	case <-q.qmp.done:
	case <-time.After(2 * time.Second):
	}
	q.qmp.close()

	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case q.killed != "":
		q.err = fmt.Errorf("vm %s: killed (%s): %w", q.cfg.ID, q.killed, errdefs.ErrAborted)
	case waitErr != nil:
		q.err = fmt.Errorf("vm %s: qemu failed: %v: %w; %s", q.cfg.ID, waitErr, errdefs.ErrUnavailable,
			q.diagnostics())
	case q.shutdown == "guest-shutdown":
		q.err = nil
	case q.shutdown == "guest-reset" || q.shutdown == "guest-panic":
		// panic=-1 turns a kernel panic (e.g. /init exiting) into a
		// reset, which -no-reboot turns into an exit.
		q.err = fmt.Errorf("vm %s: guest reset or panicked (%s): %w; %s", q.cfg.ID, q.shutdown, errdefs.ErrUnavailable,
			describeTail("console", q.consoleTail(consoleTailBytes)))
	default:
		q.err = fmt.Errorf("vm %s: qemu exited (shutdown reason %q): %w", q.cfg.ID, q.shutdown, errdefs.ErrUnavailable)
	}
	close(q.done)
}

// killLocked sends SIGKILL; the reaper notices. Callers hold q.mu.
func (q *QEMU) killLocked(why string) {
	if q.proc == nil {
		return
	}
	select {
	case <-q.done:
		return
	default:
	}
	if q.killed == "" {
		q.killed = why
	}
	_ = q.proc.kill()
}

// AgentConn waits until the guest has opened the agent port (so the agent
// is up and reading), bounded by ctx. The error of a VM that exits or
// stays silent carries the console tail: that is where a boot failure
// shows.
func (q *QEMU) AgentConn(ctx context.Context) (net.Conn, error) {
	q.mu.Lock()
	started := q.proc != nil
	q.mu.Unlock()
	if !started {
		return nil, fmt.Errorf("vm %s: not started: %w", q.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	give := func() (net.Conn, error) {
		q.mu.Lock()
		defer q.mu.Unlock()
		q.agentGiven = true
		return q.agent, nil
	}
	// An opened channel wins over an exit, so a VM that answered and
	// then powered off still hands out the data it left in the socket.
	select {
	case <-q.agentOpen:
		return give()
	default:
	}
	select {
	case <-q.agentOpen:
		return give()
	case <-q.done:
		select {
		case <-q.agentOpen:
			return give()
		default:
		}
		return nil, fmt.Errorf("vm %s exited before the agent opened its channel: %w", q.cfg.ID, q.Err())
	case <-ctx.Done():
		return nil, fmt.Errorf("vm %s: agent did not open its channel: %w; %s", q.cfg.ID, ctx.Err(),
			describeTail("console", q.ConsoleTail(consoleTailBytes)))
	}
}

// Pause stops the guest's CPUs.
func (q *QEMU) Pause(ctx context.Context) error { return q.monitor(ctx, "stop") }

// Resume lets a paused guest run again.
func (q *QEMU) Resume(ctx context.Context) error { return q.monitor(ctx, "cont") }

func (q *QEMU) monitor(ctx context.Context, cmd string) error {
	q.mu.Lock()
	qmp := q.qmp
	q.mu.Unlock()
	if qmp == nil {
		return fmt.Errorf("vm %s: not started: %w", q.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	select {
	case <-q.done:
		return fmt.Errorf("vm %s: exited: %w", q.cfg.ID, errdefs.ErrFailedPrecondition)
	default:
	}
	if _, err := qmp.execute(ctx, cmd, nil); err != nil {
		return fmt.Errorf("vm %s: %w", q.cfg.ID, err)
	}
	return nil
}

// Stop waits for the VM to exit until ctx ends, then kills qemu, and
// returns once it is gone. How the VM ended is Err's business; Stop
// fails only if it was never started... which is no failure either.
func (q *QEMU) Stop(ctx context.Context) error {
	q.mu.Lock()
	if q.proc == nil {
		q.mu.Unlock()
		return nil
	}
	q.mu.Unlock()
	select {
	case <-q.done:
	case <-ctx.Done():
		q.mu.Lock()
		q.killLocked("stop deadline passed")
		q.mu.Unlock()
		<-q.done
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.agentGiven && q.agent != nil {
		// Nobody took the channel, so nobody else will close it.
		q.agent.Close()
	}
	return nil
}

// Done is closed once qemu has exited.
func (q *QEMU) Done() <-chan struct{} { return q.done }

// Err says why the VM exited: nil after the guest powered off, an error
// for a reset or panic, a qemu failure, or a kill. It is nil while the VM
// runs.
func (q *QEMU) Err() error {
	select {
	case <-q.done:
	default:
		return nil
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

// ConsoleTail returns up to the last n bytes of the guest console.
func (q *QEMU) ConsoleTail(n int) string { return q.consoleTail(n) }

func (q *QEMU) consoleTail(n int) string { return tailFile(q.consolePath(), n) }

// attach makes a started hypervisor process this machine's (a child, or a
// pooled VM's pidfd), with the host ends of its agent channel and QMP
// socket, and starts watching it. q.mu is held.
func (q *QEMU) attach(proc process, agent, qmpConn net.Conn) {
	q.proc = proc
	q.agent = agent
	q.qmp = newQMP(qmpConn, q.onEvent)
	go q.reap()
}

// undoFailedStart, deferred by a start with q.mu held after attach, kills the
// hypervisor when the start fails, waits for it to be reaped and adds its
// diagnostics (log tail, console) to the error.
func (q *QEMU) undoFailedStart(retErr *error) {
	if *retErr == nil {
		return
	}
	q.killLocked("start failed")
	q.mu.Unlock()
	<-q.done
	q.mu.Lock()
	*retErr = fmt.Errorf("%w\n%s", *retErr, q.diagnostics())
}

// Pid is qemu's process id, or 0 before Start.
func (q *QEMU) Pid() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.proc == nil {
		return 0
	}
	return q.proc.pid()
}

// BootStarted is when qemu was executed.
func (q *QEMU) BootStarted() time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.bootStarted
}

// process is a running qemu: waited for by its reaper, killed by kill.
type process interface {
	// wait blocks until the process has exited.
	wait() error
	kill() error
	pid() int
}

// childProcess is a qemu this process started (and reaps).
type childProcess struct{ cmd *exec.Cmd }

func (c childProcess) wait() error { return c.cmd.Wait() }
func (c childProcess) kill() error { return c.cmd.Process.Kill() }
func (c childProcess) pid() int    { return c.cmd.Process.Pid }

// socketpair returns our end as a net.Conn (it supports CloseWrite) and
// the child's end as a file to inherit.
func socketpair() (net.Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	host := os.NewFile(uintptr(fds[0]), "vm-host")
	child := os.NewFile(uintptr(fds[1]), "vm-child")
	conn, err := net.FileConn(host) // dups the fd
	host.Close()
	if err != nil {
		child.Close()
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return conn, child, nil
}

// diagnostics describes qemu's own log and the guest console for errors
// about qemu failing.
func (q *QEMU) diagnostics() string {
	return describeTail("qemu log", tailFile(q.logPath(), consoleTailBytes)) + "\n" +
		describeTail("console", q.consoleTail(consoleTailBytes))
}

// failEarly records an error from before qemu ran and closes done, so
// callers waiting on Done are not left hanging. Callers hold q.mu.
func (q *QEMU) failEarly(err error) error {
	q.err = err
	close(q.done)
	return err
}
