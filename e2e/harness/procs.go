package harness

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Process tracking.
//
// containerd starts each shim with `shim start`, which forks the long-lived shim and exits; the shim is
// then an orphan and would be re-parented to PID 1, out of sight. The harness makes the test process a
// child subreaper (prctl PR_SET_CHILD_SUBREAPER), so every orphan among its descendants (shims, and
// hypervisors or container processes whose shim died) is re-parented to the test process instead. "Everything
// this test caused to run" is then exactly "the descendants of the test process", which the harness can
// list and, on cleanup, kill by PID. Nothing is ever looked up or killed by name.
//
// A subreaper must reap the orphans it inherits, or they stay zombies. A reaper goroutine does that, but it
// must not reap a child that os/exec is waiting for (its Wait would fail with ECHILD). So every process the
// test binary starts goes through StartCmd, which registers its PID while holding startMu; the reaper holds
// startMu exclusively while it scans, and only reaps zombies that are not registered.

var (
	// startMu is held shared by StartCmd from fork until the child's PID is registered, and exclusively by
	// the reaper's scan, so the reaper never sees an unregistered child of os/exec.
	startMu sync.RWMutex
	// ownMu guards own.
	ownMu sync.Mutex
	// own holds the PIDs of children started through StartCmd that os/exec still has to wait for.
	own = map[int]bool{}

	subreaperOnce sync.Once
	subreaperErr  error
)

// enableSubreaper makes the test process the subreaper of its descendants and starts the reaper. It is
// idempotent; the harness calls it before starting containerd.
func enableSubreaper() error {
	subreaperOnce.Do(func() {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			subreaperErr = fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
			return
		}
		go reapLoop()
	})
	return subreaperErr
}

// StartCmd starts cmd the way every process in a harness-using test binary must be started (see the
// package comment on process tracking). start is what actually starts it: nil means cmd.Start, and a
// caller that needs another starter (such as a pty library) passes its own. Call WaitCmd, not cmd.Wait.
func StartCmd(cmd *exec.Cmd, start func() error) error {
	if start == nil {
		start = cmd.Start
	}
	startMu.RLock()
	defer startMu.RUnlock()
	if err := start(); err != nil {
		return err
	}
	ownMu.Lock()
	own[cmd.Process.Pid] = true
	ownMu.Unlock()
	return nil
}

// WaitCmd waits for a command started with StartCmd and forgets its PID, which the kernel may reuse.
func WaitCmd(cmd *exec.Cmd) error {
	err := cmd.Wait()
	ownMu.Lock()
	delete(own, cmd.Process.Pid)
	ownMu.Unlock()
	return err
}

// RunCmd is StartCmd followed by WaitCmd.
func RunCmd(cmd *exec.Cmd) error {
	if err := StartCmd(cmd, nil); err != nil {
		return err
	}
	return WaitCmd(cmd)
}

// Output is cmd.Output for a harness-using test binary: the command runs
// through RunCmd, so the reaper cannot take its exit from os/exec.
func Output(cmd *exec.Cmd) ([]byte, error) {
	var out bytes.Buffer
	cmd.Stdout = &out
	err := RunCmd(cmd)
	return out.Bytes(), err
}

// CombinedOutput is cmd.CombinedOutput, run through RunCmd.
func CombinedOutput(cmd *exec.Cmd) ([]byte, error) {
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := RunCmd(cmd)
	return out.Bytes(), err
}

func reapLoop() {
	for {
		reapOrphans()
		time.Sleep(100 * time.Millisecond)
	}
}

// reapOrphans reaps the zombie children that were inherited as a subreaper, never one of os/exec's.
func reapOrphans() {
	startMu.Lock()
	defer startMu.Unlock()
	self := os.Getpid()
	procs, err := listProcs()
	if err != nil {
		return
	}
	for _, p := range procs {
		if p.PPid != self || p.State != 'Z' {
			continue
		}
		ownMu.Lock()
		mine := own[p.Pid]
		ownMu.Unlock()
		if mine {
			continue
		}
		var ws unix.WaitStatus
		_, _ = unix.Wait4(p.Pid, &ws, unix.WNOHANG, nil)
	}
}

// Proc is one process as /proc shows it.
type Proc struct {
	Pid, PPid int
	// State is the one-letter state from /proc/PID/stat ('Z' for a zombie).
	State byte
	// StartTime is the start time in clock ticks since boot; with Pid it identifies a process even
	// if the PID is reused.
	StartTime uint64
	// Cmdline is the NUL-separated command line, joined with spaces (empty for kernel threads and zombies).
	Cmdline string
}

func (p Proc) String() string {
	cmd := p.Cmdline
	if len(cmd) > 200 {
		cmd = cmd[:200] + "..."
	}
	return fmt.Sprintf("pid %d (ppid %d, state %c): %s", p.Pid, p.PPid, p.State, cmd)
}

// listProcs reads every process from /proc. Processes that vanish during the walk are skipped.
func listProcs() ([]Proc, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []Proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p, err := readProc(pid)
		if err != nil {
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

func readProc(pid int) (Proc, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Proc{}, err
	}
	// The command name (field 2) is in parentheses and may itself hold spaces or parentheses: parse
	// from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return Proc{}, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+2:]))
	// f[0] is field 3 (state); ppid is field 4, starttime field 22.
	if len(f) < 20 {
		return Proc{}, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ppid, _ := strconv.Atoi(f[1])
	start, _ := strconv.ParseUint(f[19], 10, 64)
	cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return Proc{
		Pid:       pid,
		PPid:      ppid,
		State:     f[0][0],
		StartTime: start,
		Cmdline:   strings.TrimSpace(string(bytes.ReplaceAll(cmd, []byte{0}, []byte{' '}))),
	}, nil
}

// Descendants lists the live (non-zombie) descendants of pid, parents before children.
func Descendants(pid int) ([]Proc, error) {
	procs, err := listProcs()
	if err != nil {
		return nil, err
	}
	children := map[int][]Proc{}
	for _, p := range procs {
		children[p.PPid] = append(children[p.PPid], p)
	}
	var out []Proc
	queue := []int{pid}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for _, c := range children[cur] {
			queue = append(queue, c.Pid)
			if c.State != 'Z' {
				out = append(out, c)
			}
		}
	}
	return out, nil
}

// Alive reports whether the process p (same PID and start time) still runs and is not a zombie.
func Alive(p Proc) bool {
	cur, err := readProc(p.Pid)
	return err == nil && cur.StartTime == p.StartTime && cur.State != 'Z'
}

// KillProcs sends SIGKILL to each process that is still the one recorded (PID and start time), then
// waits up to timeout for all of them to be gone. It returns those still alive after that.
func KillProcs(procs []Proc, timeout time.Duration) []Proc {
	for _, p := range procs {
		if Alive(p) {
			_ = unix.Kill(p.Pid, unix.SIGKILL)
		}
	}
	deadline := time.Now().Add(timeout)
	for {
		var alive []Proc
		for _, p := range procs {
			if Alive(p) {
				alive = append(alive, p)
			}
		}
		if len(alive) == 0 || time.Now().After(deadline) {
			return alive
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// untrackedDescendants lists the test process's live descendants that were not started through StartCmd
// and are not descendants of one that was still running (those belong to a caller still using them).
func untrackedDescendants(exclude ...int) ([]Proc, error) {
	all, err := Descendants(os.Getpid())
	if err != nil {
		return nil, err
	}
	skip := map[int]bool{}
	for _, pid := range exclude {
		skip[pid] = true
	}
	var out []Proc
	for _, p := range all {
		if skip[p.Pid] || skip[p.PPid] {
			skip[p.Pid] = true
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

// socketHolders returns the PIDs of processes that have the unix socket bound at path open, by matching
// the socket's inode from /proc/net/unix against every process's fds. This is how a shim is found from
// the address containerd recorded for it, with no guessing by process name.
//
// The list is read from /proc/thread-self/net, not /proc/net (/proc/self/net: the network namespace of
// the process's main thread). Tests create network namespaces on locked threads that are then
// discarded, but a locked goroutine that ends on the main thread does not end it: Go parks ("wedges")
// the main thread, still in the namespace the goroutine entered, so /proc/net would list that
// namespace's sockets and miss every shim's (TestPod failed so after the network tests).
// An unlocked goroutine always runs on a thread in the test's own namespace.
func socketHolders(path string) ([]int, error) {
	f, err := os.Open("/proc/thread-self/net/unix")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	inodes := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path
		fields := strings.Fields(sc.Text())
		if len(fields) >= 8 && fields[7] == path {
			inodes["socket:["+fields[6]+"]"] = true
		}
	}
	if len(inodes) == 0 {
		return nil, fmt.Errorf("no socket bound at %s", path)
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range procs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", e.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join("/proc", e.Name(), "fd", fd.Name()))
			if err == nil && inodes[target] {
				pids = append(pids, pid)
				break
			}
		}
	}
	sort.Ints(pids)
	return pids, nil
}

// mountsUnder lists the mount points below dir, deepest first (the order to unmount them in).
func mountsUnder(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountPath(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space and so on).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountAll detaches every mount below dir.
func unmountAll(dir string) error {
	mps, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}
