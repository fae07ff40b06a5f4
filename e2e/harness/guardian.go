package harness

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The guardian cleans up after a test process that dies without running its cleanups: `go test
// -timeout` panics, a crash, SIGKILL. Without it, containerd, every shim and every VM it started keep
// running (orphans go to PID 1 once the subreaper is gone), and the temporary directory keeps its mounts.
//
// Start launches the guardian as a re-exec of the test binary itself (any binary that imports this
// package works: the check below runs in init, before TestMain). It holds the read end of a pipe whose
// write end only the test process has. Cleanup writes "done" and the guardian exits quietly; an EOF
// without "done" means the test process is gone, and the guardian kills by PID everything that belongs
// to the private directory: containerd (its PID file), the processes holding shim sockets, any process
// whose command line names the directory (shims, hypervisors), and all their descendants, found before
// anything is killed. Then it detaches the mounts and removes the directory, and reports what it did in
// GuardianLog.

const (
	envGuardianDir = "MACVM_HARNESS_GUARDIAN_DIR"
	guardianDone   = "done"
	// pidFileName is where the harness records containerd's PID for the guardian.
	pidFileName = "containerd.pid"
	// namespaceFileName records the daemon's containerd namespace, which names its host cgroups.
	namespaceFileName = "namespace"
)

func init() {
	if dir := os.Getenv(envGuardianDir); dir != "" {
		os.Exit(guard(dir, os.Stdin))
	}
}

// guardian is the handle the test process keeps on its guardian.
type guardian struct {
	cmd *exec.Cmd
	w   io.WriteCloser
}

// startGuardian starts the guardian of dir.
func startGuardian(dir string) (*guardian, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), envGuardianDir+"="+dir)
	cmd.Stdin = r
	logf, err := os.OpenFile(GuardianLog(dir), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err == nil {
		defer logf.Close()
		cmd.Stdout, cmd.Stderr = logf, logf
	}
	// Its own process group: a ^C to the test must not take the guardian down with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := StartCmd(cmd, nil); err != nil {
		w.Close()
		return nil, fmt.Errorf("starting the cleanup guardian: %w", err)
	}
	return &guardian{cmd: cmd, w: w}, nil
}

// release tells the guardian the test cleaned up by itself and waits for it to exit.
func (g *guardian) release() {
	_, _ = io.WriteString(g.w, guardianDone+"\n")
	g.w.Close()
	_ = WaitCmd(g.cmd)
}

// guard is the guardian's main: it waits for the test process and cleans up dir if it died.
func guard(dir string, in io.Reader) int {
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		if sc.Text() == guardianDone {
			return 0
		}
	}
	fmt.Printf("%s: pid %d: the test process ended without cleaning up; cleaning up %s\n", time.Now().Format(time.RFC3339), os.Getpid(), dir)
	var victims []Proc
	seen := map[int]bool{}
	add := func(pid int) {
		if seen[pid] || pid == os.Getpid() {
			return
		}
		p, err := readProc(pid)
		if err != nil {
			return
		}
		seen[pid] = true
		victims = append(victims, p)
		below, _ := Descendants(pid)
		for _, d := range below {
			if !seen[d.Pid] {
				seen[d.Pid] = true
				victims = append(victims, d)
			}
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, pidFileName)); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			add(pid)
		}
	}
	if ents, err := os.ReadDir(filepath.Join(dir, "s")); err == nil {
		for _, e := range ents {
			pids, _ := socketHolders(filepath.Join(dir, "s", e.Name()))
			for _, pid := range pids {
				add(pid)
			}
		}
	}
	if procs, err := listProcs(); err == nil {
		for _, p := range procs {
			if strings.Contains(p.Cmdline, dir+"/") {
				add(p.Pid)
			}
		}
	}
	for _, p := range victims {
		fmt.Printf("killing %s\n", p)
	}
	if still := KillProcs(victims, 10*time.Second); len(still) > 0 {
		fmt.Printf("still alive after SIGKILL: %v\n", still)
	}
	if err := unmountAll(dir); err != nil {
		fmt.Println(err)
	}
	if ns, err := os.ReadFile(filepath.Join(dir, namespaceFileName)); err == nil {
		removeCgroups(strings.TrimSpace(string(ns)))
	}
	removeBridgeOf(dir)
	if err := os.RemoveAll(dir); err != nil {
		fmt.Println(err)
	}
	return 0
}

// GuardianLog is the file guardians append their reports to: one file next to dir (so in the temp
// directory), not one per private directory, so that reports of killed runs do not pile up as directories.
func GuardianLog(dir string) string {
	return filepath.Join(filepath.Dir(dir), "macvm-e2e-guardian.log")
}

// removeCgroups removes the (empty) host cgroups runc created under /<namespace> in every hierarchy,
// deepest first. Non-empty ones stay: rmdir refuses them.
func removeCgroups(namespace string) {
	if namespace == "" || strings.ContainsAny(namespace, "/.") {
		return
	}
	roots, _ := filepath.Glob("/sys/fs/cgroup/*/" + namespace)
	roots = append(roots, "/sys/fs/cgroup/"+namespace)
	for _, root := range roots {
		var dirs []string
		_ = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = syscall.Rmdir(dirs[i])
		}
	}
}
