package container

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/boot"
	"github.com/macvm/macvm/guest-agent/internal/seccomp"
)

// helperError carries the exit code the helper dies with and the errdefs
// class the agent reports for it.
type helperError struct {
	err  error
	exit int
	code string
}

func (e *helperError) Error() string { return e.err.Error() }

// execError is a failure to run the program itself, reported to the caller
// of StartProcess the way runc words it.
func execError(err error, exit int) error {
	return &helperError{err: err, exit: exit, code: "FailedPrecondition"}
}

// RunHelper is the main function of the helper, the agent binary re-executed
// as HelperArg0 in the container's fresh namespaces and cgroup (or, for an
// exec, in the joined namespaces). It prepares the container and the process,
// tells the agent it is ready, blocks until the agent says start, then
// execve's the program. It never returns.
func RunHelper() {
	// Capabilities and no_new_privs are per thread: everything from here to
	// execve runs on this one thread.
	runtime.LockOSThread()
	err := runHelper()
	exit := 1
	var he *helperError
	if errors.As(err, &he) {
		exit = he.exit
	}
	if err != nil {
		code := ""
		if he != nil {
			code = he.code
		}
		sendMsg(helperSyncFd, helperMsg{Type: "error", Error: err.Error(), Code: code}, -1)
	}
	os.Exit(exit)
}

func runHelper() error {
	if len(os.Args) > 1 && os.Args[1] == helperSpareArg {
		// A spare (spare.go): started ahead, it waits here for a container.
		warmConfigDecoder()
		if err := sendMsg(helperSyncFd, helperMsg{Type: "idle"}, -1); err != nil {
			return err
		}
	}
	cfgFile := os.NewFile(helperConfigFd, "config")
	var cfg helperConfig
	b, err := io.ReadAll(cfgFile)
	cfgFile.Close()
	read := time.Now()
	if err == nil {
		err = json.Unmarshal(b, &cfg)
	}
	if err != nil {
		return fmt.Errorf("helper: read config: %w", err)
	}
	tr := &helperTrace{on: cfg.Trace, last: time.Unix(0, cfg.TraceFrom)}
	tr.markAt("config read", read)
	tr.mark(fmt.Sprintf("config decode (%d bytes)", len(b)))
	if err := recvStdio(helperSyncFd, cfg.StdioFds); err != nil {
		return err
	}
	tr.mark("stdio")
	// The agent learns that execve succeeded from this socket closing.
	unix.CloseOnExec(helperSyncFd)
	if cfg.Process == nil {
		return errors.New("helper: no process in config")
	}
	if len(cfg.Join) > 0 {
		// This thread (locked, and the one that will execve) moves into
		// the container's namespaces; in the mount namespace its root
		// becomes the container's root. CLONE_FS must be private first.
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return fmt.Errorf("unshare fs: %w", err)
		}
		for i, t := range cfg.Join {
			fd := helperNSFd + i
			if err := unix.Setns(fd, nsCloneFlag[t]); err != nil {
				return fmt.Errorf("enter %s namespace: %w", t, err)
			}
			unix.Close(fd)
		}
	}
	if cfg.Init {
		if err := setupContainer(&cfg, tr); err != nil {
			return err
		}
	}
	p := cfg.Process
	master := -1
	if p.Terminal {
		if master, err = setupTerminal(p.ConsoleSize); err != nil {
			return err
		}
	}
	if err := seccompBeforeCaps(&cfg); err != nil {
		return err
	}
	if err := setupProcess(p); err != nil {
		return err
	}
	tr.mark("process")
	if err := sendMsg(helperSyncFd, helperMsg{Type: "ready", Trace: tr.String()}, master); err != nil {
		return err
	}
	if master >= 0 {
		unix.Close(master)
	}
	// The host answers the create and sends the start meanwhile.
	target := prepareExec(p)
	msg, err := recvMsg(helperSyncFd)
	if err == io.EOF {
		// The agent gave up on this process (delete before start).
		os.Exit(1)
	}
	if err != nil {
		return err
	}
	if msg.Type != "start" {
		return fmt.Errorf("helper: unexpected %q message", msg.Type)
	}
	return execProcess(p, target, cfg.Seccomp)
}

// execTarget is the program a helper will execve, looked up once the
// helper is ready, while the agent answers the create and the host
// (shim, containerd, the client) turns around to send the start: under
// emulation each step of a lookup in a 9p root is a round trip to QEMU,
// and $PATH's misses are several. The program stays open, so its dentry
// and the pages read ahead stay in the guest's caches (the pod share is
// mounted cache=mmap, which drops both as soon as nothing holds them) and
// the execve and the program's first page faults no longer go to the
// host.
type execTarget struct {
	args []string
	path string
	// err is the lookup's failure, retried at start (an OCI hook may
	// have made the file since).
	err error
	// file is the program, open (O_CLOEXEC: the execve closes it).
	file *os.File
}

// execReadahead bounds how much of the program prepareExec reads ahead.
const execReadahead = 8 << 20

// prepareExec resolves the program of p and reads its start ahead.
func prepareExec(p *specs.Process) *execTarget {
	t := &execTarget{args: p.Args}
	if len(t.args) == 0 {
		t.args = strings.Fields(p.CommandLine)
	}
	if len(t.args) == 0 {
		t.err = errors.New("exec: no program to run")
		return t
	}
	if t.path, t.err = lookPath(t.args[0], p.Env); t.err != nil {
		return t
	}
	// Best effort: a program its user may not read still runs.
	if f, err := os.Open(t.path); err == nil {
		t.file = f
		if fi, err := f.Stat(); err == nil {
			_ = unix.Fadvise(int(f.Fd()), 0, min(fi.Size(), execReadahead), unix.FADV_WILLNEED)
		}
	}
	return t
}

// execProcess replaces the helper with the container's program.
func execProcess(p *specs.Process, t *execTarget, filter *seccomp.Program) error {
	args, path := t.args, t.path
	if t.err != nil {
		if len(args) == 0 {
			return execError(t.err, 127)
		}
		var err error
		if path, err = lookPath(args[0], p.Env); err != nil {
			return execError(err, 127)
		}
	}
	if p.NoNewPrivileges {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("set no_new_privs: %w", err)
		}
	}
	if err := seccompBeforeExec(p, filter); err != nil {
		return err
	}
	err := unix.Exec(path, args, p.Env)
	exit := 126
	if errors.Is(err, unix.ENOENT) {
		exit = 127
	}
	return execError(fmt.Errorf("exec: %q: %w", path, err), exit)
}

// defaultPath is used when the process environment has no PATH, like runc.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookPath resolves file against the PATH of the process's environment
// (not the helper's), with runc's error wording.
func lookPath(file string, env []string) (string, error) {
	if strings.Contains(file, "/") {
		if err := isExecutable(file); err != nil {
			return "", fmt.Errorf("exec: %q: %w", file, err)
		}
		return file, nil
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range strings.Split(path, ":") {
		if dir == "" {
			dir = "."
		}
		cand := dir + "/" + file
		if isExecutable(cand) == nil {
			return cand, nil
		}
	}
	return "", fmt.Errorf("exec: %q: executable file not found in $PATH", file)
}

func isExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return unix.ENOENT
		}
		return err
	}
	if fi.IsDir() {
		return unix.EISDIR
	}
	if fi.Mode()&0o111 == 0 {
		return unix.EACCES
	}
	return nil
}

// setupContainer builds the container's world: namespaces the helper owns,
// mounts, devices, the new root, hostname and sysctls.
func setupContainer(cfg *helperConfig, tr *helperTrace) error {
	spec := cfg.Spec
	if spec == nil {
		return errors.New("helper: init without a spec")
	}
	if cfg.NewCgroupNS {
		if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
			return fmt.Errorf("unshare cgroup namespace: %w", err)
		}
	}
	if cfg.NewNetNS {
		if err := boot.LoopbackUp(); err != nil {
			return err
		}
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	root := cfg.Rootfs
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind rootfs: %w", err)
	}
	tr.mark("namespaces and rootfs bind")
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open rootfs: %w", err)
	}
	devIsTmpfs := false
	for _, m := range spec.Mounts {
		if err := mountInRoot(rootFD, root, m); err != nil {
			unix.Close(rootFD)
			return err
		}
		if cleanDest(m.Destination) == "/dev" && m.Type != "bind" && !hasOption(m.Options, "bind", "rbind") {
			devIsTmpfs = true
		}
	}
	unix.Close(rootFD)
	tr.mark("mounts")
	if devIsTmpfs {
		if err := setupDev(root, spec); err != nil {
			return err
		}
	}
	tr.mark("dev")
	if err := enterRoot(root); err != nil {
		return err
	}
	tr.mark("pivot_root")
	if spec.Linux != nil {
		if prop, ok := propagationOptions[spec.Linux.RootfsPropagation]; ok {
			if err := unix.Mount("", "/", "", prop, ""); err != nil {
				return fmt.Errorf("rootfs propagation %s: %w", spec.Linux.RootfsPropagation, err)
			}
		}
		for k, v := range spec.Linux.Sysctl {
			p := "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
			if err := os.WriteFile(p, []byte(v), 0); err != nil {
				return fmt.Errorf("sysctl %s: %w", k, err)
			}
		}
		for _, p := range spec.Linux.ReadonlyPaths {
			if err := readonlyPath(p); err != nil {
				return err
			}
		}
		for _, p := range spec.Linux.MaskedPaths {
			if err := maskPath(p); err != nil {
				return err
			}
		}
		tr.mark("sysctl, readonly and masked paths")
	}
	if spec.Hostname != "" {
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	if spec.Domainname != "" {
		if err := unix.Setdomainname([]byte(spec.Domainname)); err != nil {
			return fmt.Errorf("setdomainname: %w", err)
		}
	}
	if spec.Root != nil && spec.Root.Readonly {
		if err := remountReadonly("/"); err != nil {
			return fmt.Errorf("read-only root: %w", err)
		}
	}
	return nil
}

func hasOption(opts []string, names ...string) bool {
	for _, o := range opts {
		for _, n := range names {
			if o == n {
				return true
			}
		}
	}
	return false
}

// setupTerminal allocates a pty in the container's own devpts (so `tty`
// names /dev/pts/N as the container sees it), makes its slave the
// controlling terminal and stdio, and returns the master for the agent.
func setupTerminal(size *specs.Box) (int, error) {
	master, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/ptmx: %w", err)
	}
	if err := unix.IoctlSetPointerInt(master, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(master)
		return -1, fmt.Errorf("unlock pty: %w", err)
	}
	n, err := unix.IoctlGetInt(master, unix.TIOCGPTN)
	if err != nil {
		unix.Close(master)
		return -1, fmt.Errorf("pty number: %w", err)
	}
	if size != nil && size.Width > 0 && size.Height > 0 {
		_ = unix.IoctlSetWinsize(master, unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(size.Height), Col: uint16(size.Width)})
	}
	if _, err := unix.Setsid(); err != nil {
		unix.Close(master)
		return -1, fmt.Errorf("setsid: %w", err)
	}
	slave, err := unix.Open(fmt.Sprintf("/dev/pts/%d", n), unix.O_RDWR, 0)
	if err != nil {
		unix.Close(master)
		return -1, fmt.Errorf("open pty slave: %w", err)
	}
	if err := unix.IoctlSetInt(slave, unix.TIOCSCTTY, 0); err != nil {
		unix.Close(master)
		unix.Close(slave)
		return -1, fmt.Errorf("set controlling terminal: %w", err)
	}
	for fd := 0; fd < 3; fd++ {
		if err := unix.Dup3(slave, fd, 0); err != nil {
			unix.Close(master)
			return -1, fmt.Errorf("dup pty slave: %w", err)
		}
	}
	if slave > 2 {
		unix.Close(slave)
	}
	return master, nil
}

// setupProcess applies the process's limits and identity. The order matters:
// the bounding set needs CAP_SETPCAP (so before the uid change), and
// PR_SET_KEEPCAPS keeps the permitted set across the change so capset can
// then choose what the process keeps.
func setupProcess(p *specs.Process) error {
	for _, r := range p.Rlimits {
		// syscall.Setrlimit also stops the Go runtime from restoring its
		// own RLIMIT_NOFILE at exec.
		if err := syscall.Setrlimit(rlimits[r.Type], &syscall.Rlimit{Cur: r.Soft, Max: r.Hard}); err != nil {
			return fmt.Errorf("setrlimit %s: %w", r.Type, err)
		}
	}
	if p.OOMScoreAdj != nil {
		if err := os.WriteFile("/proc/self/oom_score_adj", []byte(fmt.Sprint(*p.OOMScoreAdj)), 0); err != nil {
			return fmt.Errorf("oom_score_adj: %w", err)
		}
	}
	umask := 0o022
	if p.User.Umask != nil {
		umask = int(*p.User.Umask)
	}
	syscall.Umask(umask)
	cwdErr := unix.Chdir(p.Cwd)

	if p.Capabilities != nil {
		if err := dropBounding(toCapSet(p.Capabilities.Bounding)); err != nil {
			return err
		}
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("keepcaps: %w", err)
		}
	}
	// syscall's credential calls apply to every thread of the process.
	groups := make([]int, len(p.User.AdditionalGids))
	for i, g := range p.User.AdditionalGids {
		groups[i] = int(g)
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(int(p.User.GID), int(p.User.GID), int(p.User.GID)); err != nil {
		return fmt.Errorf("setgid %d: %w", p.User.GID, err)
	}
	if err := syscall.Setresuid(int(p.User.UID), int(p.User.UID), int(p.User.UID)); err != nil {
		return fmt.Errorf("setuid %d: %w", p.User.UID, err)
	}
	if p.Capabilities != nil {
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 0, 0, 0, 0); err != nil {
			return fmt.Errorf("keepcaps: %w", err)
		}
		if err := applyCaps(p.Capabilities); err != nil {
			return err
		}
	}
	if cwdErr != nil {
		// The directory may only be reachable as the target user.
		if err := unix.Chdir(p.Cwd); err != nil {
			return fmt.Errorf("chdir to cwd (%q) set in config.json failed: %w", p.Cwd, err)
		}
	}
	return nil
}

// sendMsg writes one packet, with fd attached as SCM_RIGHTS when >= 0.
func sendMsg(sock int, m helperMsg, fd int) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if err := unix.Sendmsg(sock, b, oob, nil, 0); err != nil {
		return fmt.Errorf("helper sync: %w", err)
	}
	return nil
}

// recvMsg reads one packet; io.EOF when the peer closed its end.
func recvMsg(sock int) (helperMsg, error) {
	var m helperMsg
	buf := make([]byte, 64<<10)
	for {
		n, _, _, _, err := unix.Recvmsg(sock, buf, nil, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return m, fmt.Errorf("helper sync: %w", err)
		}
		if n == 0 {
			return m, io.EOF
		}
		if err := json.Unmarshal(buf[:n], &m); err != nil {
			return m, fmt.Errorf("helper sync: %w", err)
		}
		return m, nil
	}
}

// helperErr turns a helper's error message into an errdefs-classed error.
func helperErr(m helperMsg) error {
	var class error = errdefs.ErrFailedPrecondition
	switch m.Code {
	case "NotFound":
		class = errdefs.ErrNotFound
	case "InvalidArgument":
		class = errdefs.ErrInvalidArgument
	}
	return fmt.Errorf("%s: %w", m.Error, class)
}
