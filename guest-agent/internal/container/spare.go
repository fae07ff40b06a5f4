package container

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/reaper"
)

// spareCloneflags are the namespaces a spare helper is started in: the set
// a standalone container or a pod's sandbox gets (ctr run, nerdctl run,
// docker, CRI: new mount, PID, IPC and UTS namespaces). The network
// namespace is the VM's own (the shim drops it from the spec), and the
// cgroup namespace is the helper's own unshare either way.
const spareCloneflags = unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS

// helperSpareArg as the helper's argv[1] makes it a spare: it says "idle"
// once it waits for its config.
const helperSpareArg = "spare"

// spareHelper is a container helper started ahead, in fresh namespaces,
// blocked before reading its config. Starting a helper is most of a
// container's create under emulation: cloning the namespaces, the execve
// of the agent binary and the Go runtime's start (every package's init)
// take hundreds of milliseconds on a TCG guest whose translated code a
// warm-start clone must first rebuild. A spare made at boot is in the
// warm-start template, so a clone's first container starts from a helper
// that has done all of that already.
type spareHelper struct {
	pid   int
	proc  *os.Process
	exitc <-chan reaper.Exit
	// sync is the agent's end of the helper's sync socket, cfgW the write
	// end of its config pipe.
	sync int
	cfgW *os.File
	// idle is closed once the helper said it waits for its config, or
	// failed to (idleErr, written before the close).
	idle    chan struct{}
	idleErr error
}

// StartSpare starts the spare helper the first container of the VM may
// take (see spareHelper). /run must be a shared mount: the spare's copy of
// the agent's mounts is taken now, and the container's root, shares and
// /dev/shm, mounted under /run later, reach it by propagation.
func (m *Manager) StartSpare() error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("spare helper: socketpair: %w", err)
	}
	childSync := os.NewFile(uintptr(fds[1]), "sync")
	defer childSync.Close()
	cfgR, cfgW, err := os.Pipe()
	if err != nil {
		unix.Close(fds[0])
		return fmt.Errorf("spare helper: %w", err)
	}
	defer cfgR.Close()
	cmd := &exec.Cmd{
		Path:        "/proc/self/exe",
		Args:        []string{HelperArg0, helperSpareArg},
		Env:         []string{"PATH=" + defaultPath},
		ExtraFiles:  []*os.File{childSync, cfgR},
		SysProcAttr: &unix.SysProcAttr{Cloneflags: spareCloneflags},
	}
	pid, exitc, err := m.reaper.Start(func() (int, error) {
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		return cmd.Process.Pid, nil
	})
	if err != nil {
		unix.Close(fds[0])
		cfgW.Close()
		return fmt.Errorf("spare helper: %w", err)
	}
	sp := &spareHelper{pid: pid, proc: cmd.Process, exitc: exitc, sync: fds[0], cfgW: cfgW, idle: make(chan struct{})}
	go func() {
		msg, err := recvMsg(sp.sync)
		if err == nil && msg.Type != "idle" {
			err = fmt.Errorf("spare helper said %q: %w", msg.Type, errdefs.ErrUnknown)
		}
		sp.idleErr = err
		close(sp.idle)
	}()
	m.mu.Lock()
	m.spare = sp
	m.mu.Unlock()
	return nil
}

// StartSpareAsync starts the spare helper in the background (logging a
// failure: containers then start helpers afresh); SpareSettled is false
// until it is idle or failed.
func (m *Manager) StartSpareAsync(logf func(string, ...any)) {
	m.mu.Lock()
	m.spareStarting = true
	m.mu.Unlock()
	go func() {
		if err := m.StartSpare(); err != nil {
			logf("%v", err)
		}
		m.mu.Lock()
		m.spareStarting = false
		m.mu.Unlock()
	}()
}

// SpareSettled tells whether the spare helper, if any, has finished
// starting: a warm-start template is saved only then.
func (m *Manager) SpareSettled() bool {
	m.mu.Lock()
	sp, starting := m.spare, m.spareStarting
	m.mu.Unlock()
	if sp == nil {
		return !starting
	}
	select {
	case <-sp.idle:
		return true
	default:
		return false
	}
}

// takeSpare hands out the spare helper for a container's init that wants
// exactly its namespaces, waiting for it to be idle; nil means start a
// helper afresh (no spare, another namespace set, or a spare that failed).
// The first container's init decides: a spare it cannot use is discarded,
// since the later containers of a pod join namespaces and could not use it
// either, and an idle spare only holds guest memory.
func (m *Manager) takeSpare(ctx context.Context, cloneflags uintptr, join []nsJoin) *spareHelper {
	m.mu.Lock()
	sp := m.spare
	m.spare = nil
	m.mu.Unlock()
	if sp == nil {
		return nil
	}
	if cloneflags != spareCloneflags || len(join) > 0 {
		go sp.discard()
		return nil
	}
	select {
	case <-sp.idle:
	case <-ctx.Done():
		sp.discard()
		return nil
	}
	if sp.idleErr != nil {
		sp.discard()
		return nil
	}
	select {
	case <-sp.exitc:
		// It died idle (the guest's OOM killer, a stray kill): the exit
		// channel is closed after its one value, so discard still works.
		go sp.discard()
		return nil
	default:
	}
	return sp
}

// discard kills a spare helper that is not used and releases its files.
func (sp *spareHelper) discard() {
	sp.proc.Signal(unix.SIGKILL)
	<-sp.exitc
	// The wait for "idle" reads sync until the dead helper's end closes:
	// only then may the fd go.
	<-sp.idle
	unix.Close(sp.sync)
	sp.cfgW.Close()
}

// joinCgroup moves the spare into the container's cgroup (open as
// cgroupFD), before it reads its config: the helper unshares its cgroup
// namespace once there.
func (sp *spareHelper) joinCgroup(cgroupFD int) error {
	if err := moveToCgroup(cgroupFD, sp.pid); err != nil {
		return fmt.Errorf("spare helper: %w", err)
	}
	return nil
}

// moveToCgroup writes pid to the cgroup.procs of the cgroup open as
// cgroupFD.
func moveToCgroup(cgroupFD, pid int) error {
	fd, err := unix.Openat(cgroupFD, "cgroup.procs", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open cgroup.procs: %w", err)
	}
	defer unix.Close(fd)
	if _, err := unix.Write(fd, []byte(strconv.Itoa(pid))); err != nil {
		return fmt.Errorf("join cgroup: %w", err)
	}
	return nil
}

// sendStdio passes the spare its stdio (files[i] becomes its fd
// targets[i]) over the sync socket; a fresh helper gets them at fork.
func sendStdio(sock int, files []*os.File) error {
	if len(files) == 0 {
		return nil
	}
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	if err := unix.Sendmsg(sock, []byte(`{"type":"stdio"}`), unix.UnixRights(fds...), nil, 0); err != nil {
		return fmt.Errorf("spare helper: send stdio: %w", err)
	}
	return nil
}

// recvStdio is the helper's side of sendStdio: it puts the received files
// on targets (they survive the execve) and closes the originals.
func recvStdio(sock int, targets []int) error {
	if len(targets) == 0 {
		return nil
	}
	buf := make([]byte, 256)
	oob := make([]byte, unix.CmsgSpace(4*len(targets)))
	for {
		_, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("helper: receive stdio: %w", err)
		}
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(cmsgs) == 0 {
			return errors.New("helper: stdio message without files")
		}
		fds, err := unix.ParseUnixRights(&cmsgs[0])
		if err != nil || len(fds) != len(targets) {
			return fmt.Errorf("helper: got %d stdio files, want %d", len(fds), len(targets))
		}
		for i, fd := range fds {
			if err := unix.Dup3(fd, targets[i], 0); err != nil {
				return fmt.Errorf("helper: stdio: %w", err)
			}
			unix.Close(fd)
		}
		return nil
	}
}
