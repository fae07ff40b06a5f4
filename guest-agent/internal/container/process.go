package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/reaper"
)

// drainTimeout bounds how long an exited process's output may keep flowing:
// a daemonised grandchild holding the pipe must not hold up WaitProcess.
const drainTimeout = 2 * time.Second

// Stdio names the host-opened streams of a process ("" = /dev/null).
type Stdio struct {
	Stdin, Stdout, Stderr string
	Terminal              bool
}

// Process is one init or exec process of a container, seen from the agent.
type Process struct {
	// ID is the exec id; "" for the container's init.
	ID  string
	pid int
	// proc is Go's handle on the child: its signals go through a pidfd, so
	// they can never reach another process that reuses the pid after the
	// reaper collected this one. It is never waited on (the reaper is).
	proc *os.Process

	// sync is the helper's sync socket until StartProcess (then -1).
	sync int
	// console is the pty master when the process has a terminal.
	console *os.File
	// stdinW feeds the process's stdin pipe; stdinConn is the host's stream.
	stdinW    *os.File
	stdinConn net.Conn
	// outputs are the read ends the copiers drain (closed to cut a drain
	// short); conns are every host stream the process uses.
	outputs []*os.File
	conns   []net.Conn
	// ioWG counts the output copiers.
	ioWG sync.WaitGroup

	// mu guards state, exitStatus, exitedAt and sync.
	mu         sync.Mutex
	state      State
	exitStatus uint32
	exitedAt   time.Time
	// exited is closed when the process has been reaped; done once its
	// output has also been drained (or the drain timed out).
	exited chan struct{}
	done   chan struct{}

	// trace, if set, reports the exec and the exit (spawnSpec.trace);
	// startedAt, written by Start before it releases the helper and read
	// once exited is closed, times the exit.
	trace     func(format string, args ...any)
	startedAt time.Time
}

// Pid is the process's pid in the guest's (agent's) PID namespace.
func (p *Process) Pid() int { return p.pid }

// State reports the process's current state.
func (p *Process) State() State {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}

// spawnSpec is what spawn needs to start a helper.
type spawnSpec struct {
	cfg        *helperConfig
	stdio      Stdio
	cloneflags uintptr
	join       []nsJoin
	cgroupFD   int
	// joinCgroupLate forks the helper in the agent's cgroup and moves it
	// into cgroupFD's before it reads its config, instead of forking it
	// into that cgroup (CLONE_INTO_CGROUP). An exec's cgroup may be
	// frozen (a paused container): a fork into it does not return until
	// the thaw (Go forks with CLONE_VFORK), and a Go garbage collection
	// that starts meanwhile waits for the forking thread, which stops the
	// whole agent (the thaw never comes: it is an RPC). A helper moved in
	// later just freezes, and only its exec waits for the thaw.
	joinCgroupLate bool
	// helperNS are namespaces the helper joins itself (cfg.Join).
	helperNS []*os.File
	// spare, if set, is the helper to use instead of starting one: it
	// already runs in namespaces that match cloneflags (spare.go).
	spare *spareHelper
	// onExit runs after the exit is recorded and output drained.
	onExit func(*Process)
	// trace, if set, gets the helper's step durations (cfg.Trace) and
	// the process's exec and exit times (Config.Trace).
	trace func(format string, args ...any)
}

// streamWaitTimeout bounds the wait for the host to open a process's stdio
// streams; the host opens them right before (or after) the request.
const streamWaitTimeout = 10 * time.Second

// spawn starts a helper with its stdio wired to the host streams and waits
// until it is ready (blocked before execve) or has failed.
func spawn(ctx context.Context, r *reaper.Reaper, streams Streams, ss spawnSpec) (_ *Process, retErr error) {
	spawnStart := time.Now()
	p := &Process{sync: -1, exited: make(chan struct{}), done: make(chan struct{})}
	var cleanups []func()
	defer func() {
		if retErr != nil {
			for i := len(cleanups) - 1; i >= 0; i-- {
				cleanups[i]()
			}
		}
	}()
	closeLater := func(c io.Closer) { cleanups = append(cleanups, func() { c.Close() }) }
	if ss.spare != nil {
		cleanups = append(cleanups, ss.spare.discard)
	}

	sctx, cancel := context.WithTimeout(ctx, streamWaitTimeout)
	defer cancel()
	getStream := func(name string) (net.Conn, error) {
		if name == "" {
			return nil, nil
		}
		c, err := streams.Wait(sctx, name)
		if err != nil {
			return nil, fmt.Errorf("stdio stream %q: %w", name, err)
		}
		closeLater(c)
		p.conns = append(p.conns, c)
		return c, nil
	}
	inConn, err := getStream(ss.stdio.Stdin)
	if err != nil {
		return nil, err
	}
	outConn, err := getStream(ss.stdio.Stdout)
	if err != nil {
		return nil, err
	}
	errConn, err := getStream(ss.stdio.Stderr)
	if err != nil {
		return nil, err
	}

	// The helper: a spare started ahead (spare.go), or one started now.
	var cmd *exec.Cmd
	var cfgW *os.File
	var exitc <-chan reaper.Exit
	var childEndsOfHelper []*os.File
	if sp := ss.spare; sp != nil {
		p.sync, cfgW = sp.sync, sp.cfgW // discard closes them on failure
	} else {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("socketpair: %w", err)
		}
		p.sync = fds[0]
		cleanups = append(cleanups, func() { unix.Close(fds[0]) })
		childSync := os.NewFile(uintptr(fds[1]), "sync")
		defer childSync.Close()
		cfgR, w, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		defer cfgR.Close()
		// The agent must not keep the child's ends once it runs: a helper
		// that dies before it is ready must read as EOF (recvReady).
		childEndsOfHelper = []*os.File{childSync, cfgR}
		cfgW = w
		closeLater(cfgW)
		cmd = &exec.Cmd{
			Path:       "/proc/self/exe",
			Args:       []string{HelperArg0},
			Env:        []string{"PATH=" + defaultPath},
			ExtraFiles: []*os.File{childSync, cfgR},
			SysProcAttr: &unix.SysProcAttr{
				Cloneflags:  ss.cloneflags,
				UseCgroupFD: ss.cgroupFD >= 0 && !ss.joinCgroupLate,
				CgroupFD:    ss.cgroupFD,
			},
		}
		cmd.ExtraFiles = append(cmd.ExtraFiles, ss.helperNS...)
	}
	// The child's ends of the pipes (to become its fds childFds), closed
	// in the agent once the child has them.
	var childEnds []*os.File
	var childFds []int
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	if !ss.stdio.Terminal {
		if inConn != nil {
			r, w, err := os.Pipe()
			if err != nil {
				return nil, err
			}
			_ = growPipe(w) // best effort: a default pipe only costs speed (stdio.go)
			childEnds, childFds = append(childEnds, r), append(childFds, 0)
			closeLater(w)
			p.stdinW, p.stdinConn = w, inConn
		}
		for i, conn := range []net.Conn{outConn, errConn} {
			if conn == nil {
				continue
			}
			r, w, err := os.Pipe()
			if err != nil {
				return nil, err
			}
			_ = growPipe(r) // best effort: a default pipe only costs speed (stdio.go)
			childEnds, childFds = append(childEnds, w), append(childFds, 1+i)
			closeLater(r)
			p.outputs = append(p.outputs, r)
		}
	}

	if ss.cfg.Trace {
		ss.trace("helper: agent streams and pipes %.1fms", float64(time.Since(spawnStart).Microseconds())/1000)
	}
	if sp := ss.spare; sp != nil {
		spareStart := time.Now()
		if ss.cgroupFD >= 0 {
			if err := sp.joinCgroup(ss.cgroupFD); err != nil {
				return nil, err
			}
		}
		if err := sendStdio(p.sync, childEnds); err != nil {
			return nil, err
		}
		if ss.cfg.Trace {
			ss.trace("helper: spare cgroup and stdio %.1fms", float64(time.Since(spareStart).Microseconds())/1000)
		}
		ss.cfg.StdioFds = childFds
		p.pid, p.proc = sp.pid, sp.proc
		exitc = sp.exitc
	} else {
		for i, f := range childEnds {
			switch childFds[i] {
			case 0:
				cmd.Stdin = f
			case 1:
				cmd.Stdout = f
			case 2:
				cmd.Stderr = f
			}
		}
		pid, ch, err := r.Start(func() (int, error) {
			if err := startInNamespaces(ss.join, cmd.Start); err != nil {
				return 0, err
			}
			return cmd.Process.Pid, nil
		})
		if err != nil {
			return nil, fmt.Errorf("start helper: %w", err)
		}
		p.pid, p.proc, exitc = pid, cmd.Process, ch
		cleanups = append(cleanups, func() {
			p.proc.Signal(unix.SIGKILL)
			<-ch
		})
		if ss.cgroupFD >= 0 && ss.joinCgroupLate {
			// Before the config is written: the helper enters the
			// container's cgroup namespace once it is in the cgroup.
			if err := moveToCgroup(ss.cgroupFD, pid); err != nil {
				return nil, fmt.Errorf("helper: %w", err)
			}
		}
	}
	for _, f := range append(childEnds, childEndsOfHelper...) {
		f.Close()
	}
	childEnds = nil

	if ss.cfg.Trace {
		ss.cfg.TraceFrom = time.Now().UnixNano()
		ss.trace("helper: agent side %.1fms", float64(time.Since(spawnStart).Microseconds())/1000)
	}
	go func() {
		json.NewEncoder(cfgW).Encode(ss.cfg)
		cfgW.Close()
	}()

	msg, master, err := recvReady(ctx, p.sync, p.proc)
	if err != nil {
		return nil, err
	}
	if msg.Type == "error" {
		return nil, helperErr(msg)
	}
	if msg.Type != "ready" {
		return nil, fmt.Errorf("helper said %q before ready: %w", msg.Type, errdefs.ErrUnknown)
	}
	if ss.trace != nil && msg.Trace != "" {
		ss.trace("helper: %s", msg.Trace)
	}
	p.trace = ss.trace
	if ss.stdio.Terminal {
		if master < 0 {
			return nil, fmt.Errorf("helper sent no pty master: %w", errdefs.ErrUnknown)
		}
		// Non-blocking so the runtime poller can interrupt reads on close.
		unix.SetNonblock(master, true)
		p.console = os.NewFile(uintptr(master), "pty-master")
		closeLater(p.console)
		p.outputs = append(p.outputs, p.console)
		if inConn != nil {
			p.stdinConn = inConn
		}
	} else if master >= 0 {
		unix.Close(master)
	}
	p.startCopiers(outConn, errConn)
	go p.waitExit(exitc, ss.onExit)
	return p, nil
}

// recvReady waits for the helper's first message, bounded by ctx: a helper
// that hangs (say, on a mount) is killed, which ends the wait with EOF.
func recvReady(ctx context.Context, sock int, proc *os.Process) (helperMsg, int, error) {
	type result struct {
		msg helperMsg
		fd  int
		err error
	}
	resc := make(chan result, 1)
	go func() {
		buf := make([]byte, 64<<10)
		oob := make([]byte, unix.CmsgSpace(4))
		for {
			n, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				resc <- result{err: fmt.Errorf("helper sync: %w", err)}
				return
			}
			if n == 0 {
				resc <- result{err: fmt.Errorf("helper exited before it was ready: %w", errdefs.ErrUnknown)}
				return
			}
			fd := -1
			if oobn > 0 {
				if cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(cmsgs) > 0 {
					if fds, err := unix.ParseUnixRights(&cmsgs[0]); err == nil && len(fds) > 0 {
						fd = fds[0]
					}
				}
			}
			var m helperMsg
			if err := json.Unmarshal(buf[:n], &m); err != nil {
				resc <- result{err: fmt.Errorf("helper sync: %w", err)}
				return
			}
			resc <- result{msg: m, fd: fd}
			return
		}
	}()
	select {
	case res := <-resc:
		return res.msg, res.fd, res.err
	case <-ctx.Done():
		proc.Signal(unix.SIGKILL)
		res := <-resc
		if res.fd >= 0 && res.err == nil {
			unix.Close(res.fd)
		}
		return helperMsg{}, -1, fmt.Errorf("helper not ready: %w", ctx.Err())
	}
}

// startCopiers copies the process's output to the host streams and the host's
// stdin stream to the process. Output streams are half-closed at EOF so the
// host reads EOF after the last byte.
func (p *Process) startCopiers(outConn, errConn net.Conn) {
	copyOut := func(src *os.File, dst net.Conn) {
		p.ioWG.Add(1)
		go func() {
			defer p.ioWG.Done()
			copyStream(dst, ttyReader{src})
			closeWrite(dst)
			if src != p.console {
				src.Close()
			}
		}()
	}
	if p.console != nil {
		if outConn != nil {
			copyOut(p.console, outConn)
		}
		if errConn != nil {
			// A spec that asked for a terminal the host's stdio did not:
			// everything goes to the pty, so the stderr stream ends now
			// rather than hold the host's reader open until delete.
			closeWrite(errConn)
		}
	} else {
		i := 0
		if outConn != nil {
			copyOut(p.outputs[i], outConn)
			i++
		}
		if errConn != nil {
			copyOut(p.outputs[i], errConn)
		}
	}
	if p.stdinConn != nil {
		go func() {
			if p.console != nil {
				io.Copy(p.console, p.stdinConn)
				return // a terminal has no EOF of its own to pass on
			}
			copyStream(p.stdinW, p.stdinConn)
			p.stdinW.Close()
		}()
	}
}

// ttyReader turns the EIO a pty master returns once the slave side is gone
// into the EOF it means.
type ttyReader struct{ f *os.File }

func (t ttyReader) Read(b []byte) (int, error) {
	n, err := t.f.Read(b)
	if err != nil && errors.Is(err, unix.EIO) {
		err = io.EOF
	}
	return n, err
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}

// waitExit records the exit, waits (bounded) for the output to drain, then
// marks the process done.
func (p *Process) waitExit(exitc <-chan reaper.Exit, onExit func(*Process)) {
	e := <-exitc
	p.mu.Lock()
	p.state, _ = transition(p.state, OpExit)
	p.exitStatus = e.ExitStatus()
	p.exitedAt = e.At
	if p.sync >= 0 {
		unix.Close(p.sync)
		p.sync = -1
	}
	p.mu.Unlock()
	close(p.exited)
	if p.trace != nil && !p.startedAt.IsZero() {
		p.trace("exit: reaped %.1fms after start", float64(e.At.Sub(p.startedAt).Microseconds())/1000)
	}

	drained := make(chan struct{})
	go func() {
		p.ioWG.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(drainTimeout):
		// Someone else still holds the write end: stop copying.
		for _, f := range p.outputs {
			f.Close()
		}
		<-drained
	}
	if onExit != nil {
		onExit(p)
	}
	if p.trace != nil && !p.startedAt.IsZero() {
		p.trace("exit: drained %.1fms after the reap", float64(time.Since(e.At).Microseconds())/1000)
	}
	close(p.done)
}

// Start releases the helper to execve the program. It returns the helper's
// error if that fails (e.g. the executable does not exist).
func (p *Process) Start() error {
	p.mu.Lock()
	next, err := transition(p.state, OpStart)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	sock := p.sync
	p.sync = -1
	p.state = next
	p.mu.Unlock()
	if sock < 0 {
		return fmt.Errorf("process has no helper to start: %w", errdefs.ErrFailedPrecondition)
	}
	defer unix.Close(sock)
	p.startedAt = time.Now()
	if err := sendMsg(sock, helperMsg{Type: "start"}, -1); err != nil {
		return fmt.Errorf("start: %w", errdefs.ErrUnknown)
	}
	// EOF means execve succeeded and closed the helper's end (CLOEXEC).
	msg, err := recvMsg(sock)
	if err == io.EOF {
		if p.trace != nil {
			p.trace("start: execve %.1fms", float64(time.Since(p.startedAt).Microseconds())/1000)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("start: %v: %w", err, errdefs.ErrUnknown)
	}
	if msg.Type == "error" {
		return helperErr(msg)
	}
	return fmt.Errorf("start: unexpected %q message: %w", msg.Type, errdefs.ErrUnknown)
}

// Signal sends sig to the process if it is still alive.
func (p *Process) Signal(sig unix.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := transition(p.state, OpSignal); err != nil {
		return err
	}
	if err := p.proc.Signal(sig); err != nil {
		if errors.Is(err, os.ErrProcessDone) || errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
		}
		return fmt.Errorf("kill %d: %w", p.pid, err)
	}
	return nil
}

// Wait blocks until the process has exited and its output is drained.
func (p *Process) Wait(ctx context.Context) (uint32, time.Time, error) {
	select {
	case <-p.done:
	case <-ctx.Done():
		return 0, time.Time{}, ctx.Err()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitStatus, p.exitedAt, nil
}

// Exited is closed once the process has been reaped.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Done is closed once the process has exited and its output is drained.
func (p *Process) Done() <-chan struct{} { return p.done }

// Resize sets the terminal's window size.
func (p *Process) Resize(width, height uint32) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := transition(p.state, OpResize); err != nil {
		return err
	}
	if p.console == nil {
		return fmt.Errorf("process has no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	ws := &unix.Winsize{Row: uint16(height), Col: uint16(width)}
	if err := unix.IoctlSetWinsize(int(p.console.Fd()), unix.TIOCSWINSZ, ws); err != nil {
		return fmt.Errorf("resize pty: %w", err)
	}
	return nil
}

// CloseStdin ends the process's stdin once what the host already sent is
// delivered: the stream's buffered bytes are still read, then the deadline
// ends the copy and the pipe is closed.
func (p *Process) CloseStdin() error {
	p.mu.Lock()
	_, err := transition(p.state, OpCloseStdin)
	p.mu.Unlock()
	if err != nil {
		return err
	}
	if p.stdinConn != nil {
		p.stdinConn.SetReadDeadline(time.Now())
	}
	return nil
}

// markDeleted moves the process to Deleted, killing a never-started helper.
func (p *Process) markDeleted() error {
	p.mu.Lock()
	next, err := transition(p.state, OpDelete)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	wasCreated := p.state == Created
	p.state = next
	p.mu.Unlock()
	if wasCreated {
		p.proc.Signal(unix.SIGKILL)
		<-p.exited
		// Recording the exit moved it to Stopped; it stays deleted.
		p.mu.Lock()
		p.state = Deleted
		p.mu.Unlock()
	}
	p.release()
	return nil
}

// release closes everything the process held once nobody can ask about it.
func (p *Process) release() {
	go func() {
		<-p.done
		for _, c := range p.conns {
			c.Close()
		}
		if p.console != nil {
			p.console.Close()
		}
	}()
}
