package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/vm"
)

// DefaultNamespace prefixes the containerd namespace each daemon works in ("e2e-<dir suffix>").
const DefaultNamespace = "e2e"

var (
	// liveMu guards live.
	liveMu sync.Mutex
	// live holds the daemons started and not yet cleaned up in this process, so that one daemon's
	// leftover check does not count another's processes (benchmarks may run several at once).
	live = map[*Containerd]bool{}
)

// Options configures a private containerd.
type Options struct {
	Paths Paths
	// Namespace is the containerd namespace of Ctr and Client (default: DefaultNamespace-<unique>).
	Namespace string
	// Debug turns on containerd's debug log (and so the shims').
	Debug bool
	// CRI keeps containerd's CRI plugins loaded; they are disabled by default because the ctr
	// scenarios do not need them and they slow start-up.
	CRI bool
	// CRIConfig configures the CRI plugin when CRI is set (CNI, sandbox image, registry mirrors).
	CRIConfig CRIConfig
	// Logf receives the harness's progress lines (t.Logf); nil discards them.
	Logf func(format string, args ...any)
	// WarmStart is the macvm shim's warm_start mode; "" is "off" (see WriteMacvmConfig). With warm start
	// on, templates go to TemplateDir below Dir.
	WarmStart string
	// MacvmConfigExtra is appended to the macvm shim's config file (TOML
	// lines, e.g. pool_size for WarmStart "pool").
	MacvmConfigExtra string
	// ErofsWritableSize, when set (e.g. "64M"), configures the erofs
	// snapshotter in block mode: each container's writable layer is an
	// ext4 image of that size, the layers erofs images (see
	// docs/macos.md, "Root filesystem").
	ErofsWritableSize string
}

// Containerd is a private containerd daemon run as a child of the test process.
type Containerd struct {
	opts Options
	// Dir holds everything the daemon owns; it is removed by Cleanup.
	Dir string
	// Address is the daemon's gRPC socket.
	Address string
	// Root and State are containerd's root and state directories.
	Root, State string
	// SocketDir is where containerd's shim manager puts shim sockets.
	SocketDir string
	// ConfigPath is containerd's config.toml; MacvmConfig is the shim's config file.
	ConfigPath, MacvmConfig string
	// TemplateDir holds the macvm shim's warm-start templates (when Options.WarmStart is on).
	TemplateDir string
	// LogPath collects the daemon's stdout and stderr (shims log through it too).
	LogPath string
	// RuncRoot is runc's state directory for the reference runtime. runc's default,
	// /run/containerd/runc, is shared by every containerd on the machine: a container ID reused by a
	// concurrent run, or left by a killed one, would collide there.
	RuncRoot string
	// Namespace is the namespace Ctr and Client use.
	Namespace string

	// guard cleans up Dir should the test process die without calling Cleanup.
	guard *guardian

	// mu guards cmd and exited, which change when the daemon is stopped and restarted.
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// Start creates a private directory, writes the configs and starts containerd, returning once it serves.
func Start(ctx context.Context, opts Options) (*Containerd, error) {
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if err := enableSubreaper(); err != nil {
		return nil, err
	}
	// A short path under /tmp, not t.TempDir(): unix socket paths (shim sockets, the VM's agent socket in
	// the bundle) must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "mvm-")
	if err != nil {
		return nil, err
	}
	if opts.Namespace == "" {
		// One namespace per daemon: runc names its cgroups /<namespace>/<id>, so two harnesses running at
		// once (or a killed run's leftovers) must not share one.
		opts.Namespace = DefaultNamespace + "-" + strings.TrimPrefix(filepath.Base(dir), "mvm-")
	}
	c := &Containerd{
		opts:        opts,
		Dir:         dir,
		Address:     filepath.Join(dir, "containerd.sock"),
		Root:        filepath.Join(dir, "root"),
		State:       filepath.Join(dir, "state"),
		SocketDir:   filepath.Join(dir, "s"),
		ConfigPath:  filepath.Join(dir, "config.toml"),
		MacvmConfig: filepath.Join(dir, "macvm.toml"),
		TemplateDir: filepath.Join(dir, "templates"),
		LogPath:     filepath.Join(dir, "containerd.log"),
		RuncRoot:    filepath.Join(dir, "runc"),
		Namespace:   opts.Namespace,
	}
	if c.guard, err = startGuardian(dir); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	fail := func(err error) (*Containerd, error) {
		_ = c.stop(5 * time.Second)
		_ = unmountAll(dir)
		c.guard.release()
		os.RemoveAll(dir)
		return nil, err
	}
	warm := opts.WarmStart
	if warm == "" {
		warm = "off"
	}
	if err := WriteMacvmConfigExtra(c.MacvmConfig, opts.Paths, warm, c.TemplateDir, opts.MacvmConfigExtra); err != nil {
		return fail(err)
	}
	if opts.CRI {
		if err := c.writeCNIConfig(); err != nil {
			return fail(err)
		}
	}
	if err := os.WriteFile(c.ConfigPath, []byte(c.config()), 0o644); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(filepath.Join(dir, namespaceFileName), []byte(c.Namespace), 0o644); err != nil {
		return fail(err)
	}
	if err := c.start(ctx); err != nil {
		return fail(err)
	}
	liveMu.Lock()
	live[c] = true
	liveMu.Unlock()
	return c, nil
}

// config renders containerd's config.toml.
func (c *Containerd) config() string {
	level := "info"
	if c.opts.Debug {
		level = "debug"
	}
	cri := ""
	if c.opts.CRI {
		cri = c.criConfig()
	}
	disabled := `["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images", "io.containerd.podsandbox.controller.v1.podsandbox"]`
	if c.opts.CRI {
		disabled = "[]"
	}
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
disabled_plugins = %[3]s

[grpc]
  address = %[4]q

[ttrpc]
  address = "%[4]s.ttrpc"

[debug]
  level = %[5]q

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.shim.v1.manager']
  socket_dir = %[6]q
  env = ["%[7]s=%[8]s"]

[plugins.'io.containerd.internal.v1.opt']
  path = "%[9]s/opt"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.macvm]
  runtime_type = %[10]q

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.macvm.options]
  ConfigPath = %[8]q
%[11]s`, c.Root, c.State, disabled, c.Address, level, c.SocketDir, EnvShimConfig, c.MacvmConfig, c.Dir, MacvmName, cri) + c.erofsConfig()
}

// erofsConfig is the erofs snapshotter's section of config.toml.
func (c *Containerd) erofsConfig() string {
	if c.opts.ErofsWritableSize == "" {
		return ""
	}
	// Images unpack into it with the walking differ (the tar applied to the
	// mounted writable image, which the snapshotter's Commit converts with
	// mkfs.erofs): containerd's own erofs differ needs mkfs.erofs --tar
	// (erofs-utils 1.7+), and Debian 12 ships 1.5, so containerd skips it.
	return fmt.Sprintf(`
[plugins.'io.containerd.snapshotter.v1.erofs']
  default_size = %[1]q

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = "linux/%[2]s"
  snapshotter = "overlayfs"
  differ = "walking"

[[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
  platform = "linux/%[2]s"
  snapshotter = "erofs"
  differ = "walking"
`, c.opts.ErofsWritableSize, runtime.GOARCH)
}

// start launches the daemon and waits until it answers.
func (c *Containerd) start(ctx context.Context) error {
	logf, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(c.opts.Paths.BinDir, "containerd"), "--config", c.ConfigPath)
	cmd.Dir = c.Dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	// containerd resolves a runtime's shim binary through its PATH: put the bin dir first.
	cmd.Env = append(withoutEnv(os.Environ(), "PATH", "NOTIFY_SOCKET"),
		"PATH="+c.opts.Paths.BinDir+string(os.PathListSeparator)+os.Getenv("PATH"))
	// Its own process group, so a ^C to the test does not reach it before cleanup runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := StartCmd(cmd, nil); err != nil {
		return fmt.Errorf("starting containerd: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = WaitCmd(cmd)
		close(exited)
	}()
	c.mu.Lock()
	c.cmd, c.exited = cmd, exited
	c.mu.Unlock()
	if err := os.WriteFile(filepath.Join(c.Dir, pidFileName), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		return err
	}
	c.opts.Logf("containerd pid %d in %s", cmd.Process.Pid, c.Dir)

	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		if err := c.ping(ctx); err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("containerd exited during start-up; log tail:\n%s", c.LogTail(4000))
		case <-ctx.Done():
			return fmt.Errorf("containerd did not serve within 60s; log tail:\n%s", c.LogTail(4000))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Containerd) ping(ctx context.Context) error {
	if _, err := os.Stat(c.Address); err != nil {
		return err
	}
	cl, err := containerd.New(c.Address, containerd.WithTimeout(2*time.Second))
	if err != nil {
		return err
	}
	defer cl.Close()
	ok, err := cl.IsServing(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("not serving")
	}
	return nil
}

// Pid returns the running daemon's PID (0 when stopped).
func (c *Containerd) Pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return 0
	}
	select {
	case <-c.exited:
		return 0
	default:
		return c.cmd.Process.Pid
	}
}

// Stop ends the daemon by PID (SIGTERM, then SIGKILL after timeout) and waits for it to exit. Shims keep
// running, as they do when a real containerd restarts.
func (c *Containerd) Stop(timeout time.Duration) error {
	return c.stop(timeout)
}

func (c *Containerd) stop(timeout time.Duration) error {
	c.mu.Lock()
	cmd, exited := c.cmd, c.exited
	c.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return nil
	case <-time.After(timeout):
	}
	_ = cmd.Process.Kill()
	<-exited
	return fmt.Errorf("containerd (pid %d) ignored SIGTERM for %v and was killed", cmd.Process.Pid, timeout)
}

// Restart stops the daemon and starts it again on the same root, state and sockets. The old process must
// be gone first: the new one would otherwise fail on the metadata database's lock.
func (c *Containerd) Restart(ctx context.Context) error {
	if err := c.stop(30 * time.Second); err != nil {
		return err
	}
	return c.start(ctx)
}

// Client connects containerd's Go client to the daemon, in the harness's namespace (see Context).
func (c *Containerd) Client() (*containerd.Client, error) {
	return containerd.New(c.Address, containerd.WithDefaultNamespace(c.Namespace), containerd.WithTimeout(10*time.Second))
}

// RuntimeOpt selects rt for a container created through the Go client, with the runtime options ctr's
// RunArgs passes.
func (c *Containerd) RuntimeOpt(rt Runtime) containerd.NewContainerOpts {
	switch rt.Name {
	case MacvmName:
		return containerd.WithRuntime(rt.Name, &runtimeoptions.Options{ConfigPath: c.MacvmConfig})
	case RuncName:
		return containerd.WithRuntime(rt.Name, &runcoptions.Options{Root: c.RuncRoot})
	}
	return containerd.WithRuntime(rt.Name, nil)
}

// Context returns ctx in the harness's namespace, for client calls.
func (c *Containerd) Context(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, c.Namespace)
}

// LogTail returns up to the last n bytes of the daemon's log, without the plugin-loading chatter of its
// start-up (which would otherwise fill the tail of a short run).
func (c *Containerd) LogTail(n int) string {
	raw, err := os.ReadFile(c.LogPath)
	if err != nil {
		return err.Error()
	}
	var b []byte
	for _, line := range bytes.SplitAfter(raw, []byte("\n")) {
		if !bytes.Contains(line, []byte(`msg="loading plugin"`)) && !bytes.Contains(line, []byte(`msg="skip loading plugin"`)) {
			b = append(b, line...)
		}
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// ImportBusybox builds the busybox test image and imports it as BusyboxImage;
// extra are more `ctr images import` flags (e.g. --snapshotter erofs).
func (c *Containerd) ImportBusybox(ctx context.Context, extra ...string) error {
	path := filepath.Join(c.Dir, "busybox.tar")
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := BuildBusyboxImage(f, BusyboxImage); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	res, err := c.Ctr(ctx, nil, append(append([]string{"images", "import"}, extra...), path)...)
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("ctr images import: exit %d: %s", res.ExitCode, res.Stderr)
	}
	return os.Remove(path)
}

// Result is the outcome of one ctr invocation.
type Result struct {
	Stdout, Stderr []byte
	// ExitCode is ctr's exit status (for `ctr run` without -d, the container's).
	ExitCode int
	Duration time.Duration
}

// String summarises a result for failure messages.
func (r Result) String() string {
	return fmt.Sprintf("exit %d after %v\nstdout (%d bytes): %q\nstderr: %q", r.ExitCode, r.Duration.Round(time.Millisecond),
		len(r.Stdout), clip(r.Stdout, 400), clip([]byte(Filtered(r.Stderr)), 4000))
}

// Filtered drops the cgroup v1 deprecation warning every containerd client prints on these hosts, so
// that what remains of stderr is the command's own.
func Filtered(stderr []byte) string {
	var keep []string
	for _, l := range strings.Split(string(stderr), "\n") {
		if strings.Contains(l, "cgroup v1") || strings.Contains(l, "cgroupv1") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

func clip(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n/2]) + fmt.Sprintf("...(%d bytes)...", len(b)-n) + string(b[len(b)-n/2:])
	}
	return string(b)
}

// CtrCommand returns an exec.Cmd for ctr talking to this daemon in its namespace; start it with StartCmd.
func (c *Containerd) CtrCommand(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"--address", c.Address, "--namespace", c.Namespace}, args...)
	cmd := exec.CommandContext(ctx, filepath.Join(c.opts.Paths.BinDir, "ctr"), full...)
	cmd.Env = append(withoutEnv(os.Environ(), "PATH"), "PATH="+c.opts.Paths.BinDir+string(os.PathListSeparator)+os.Getenv("PATH"))
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Ctr runs ctr with stdin (nil for none) and collects its output. A non-zero exit is a Result, not an
// error; the error is for ctr failing to run at all or ctx ending.
func (c *Containerd) Ctr(ctx context.Context, stdin []byte, args ...string) (Result, error) {
	cmd := c.CtrCommand(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	start := time.Now()
	err := RunCmd(cmd)
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Duration: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return res, fmt.Errorf("ctr %s: %w (%v)", strings.Join(args, " "), ctx.Err(), res)
	case errors.As(err, &ee):
		res.ExitCode = ee.ExitCode()
	default:
		return res, fmt.Errorf("ctr %s: %w", strings.Join(args, " "), err)
	}
	return res, nil
}

// RunArgs builds `ctr run` arguments for rt: `run --runtime NAME [runtime options] extra... IMAGE ID cmd...`.
func (c *Containerd) RunArgs(rt Runtime, extra []string, id string, cmd ...string) []string {
	args := []string{"run", "--runtime", rt.Name}
	switch rt.Name {
	case MacvmName:
		args = append(args, "--runtime-config-path", c.MacvmConfig)
	case RuncName:
		args = append(args, "--runc-root", c.RuncRoot)
	}
	args = append(args, extra...)
	args = append(args, BusyboxImage, id)
	return append(args, cmd...)
}

// Run is `ctr run --rm` of cmd in a new container id on rt.
func (c *Containerd) Run(ctx context.Context, rt Runtime, stdin []byte, extra []string, id string, cmd ...string) (Result, error) {
	return c.Ctr(ctx, stdin, c.RunArgs(rt, append([]string{"--rm"}, extra...), id, cmd...)...)
}

// ShimPid finds the shim serving container id from the socket address containerd recorded in its bundle.
func (c *Containerd) ShimPid(id string) (int, error) {
	return shimPidOf(c.BundleDir(id))
}

// shimPidOf finds the shim serving the task whose bundle is bundle.
func shimPidOf(bundle string) (int, error) {
	id := filepath.Base(bundle)
	// containerd 2.x records the shim's BootstrapResult as JSON in bootstrap.json.
	b, err := os.ReadFile(filepath.Join(bundle, "bootstrap.json"))
	if err != nil {
		return 0, err
	}
	var boot struct {
		Address string `json:"address"`
	}
	if err := json.Unmarshal(b, &boot); err != nil {
		return 0, fmt.Errorf("bootstrap.json of %s: %w", id, err)
	}
	path := strings.TrimPrefix(boot.Address, "unix://")
	pids, err := socketHolders(path)
	if err != nil {
		return 0, err
	}
	// The listening socket is inherited by nothing but the shim; should a child hold it too, the shim is
	// the one whose parent does not.
	holder := map[int]bool{}
	for _, p := range pids {
		holder[p] = true
	}
	for _, p := range pids {
		pr, err := readProc(p)
		if err == nil && !holder[pr.PPid] {
			return p, nil
		}
	}
	return 0, fmt.Errorf("no process holds shim socket %s", path)
}

// BundleDir is containerd's bundle directory for container id (the shim's working directory).
func (c *Containerd) BundleDir(id string) string {
	return filepath.Join(c.State, "io.containerd.runtime.v2.task", c.Namespace, id)
}

// Leftovers describes what a run left behind. Empty means clean.
type Leftovers struct {
	Procs   []Proc
	Mounts  []string
	Sockets []string
}

// Empty reports whether nothing was left.
func (l Leftovers) Empty() bool {
	return len(l.Procs) == 0 && len(l.Mounts) == 0 && len(l.Sockets) == 0
}

func (l Leftovers) String() string {
	var b strings.Builder
	for _, p := range l.Procs {
		fmt.Fprintf(&b, "process %s\n", p)
	}
	for _, m := range l.Mounts {
		fmt.Fprintf(&b, "mount %s\n", m)
	}
	for _, s := range l.Sockets {
		fmt.Fprintf(&b, "socket %s\n", s)
	}
	return b.String()
}

// Leftovers lists the processes (descendants of the test process other than the daemon, commands
// still being waited for, and what other live harness daemons in this process run), mounts under Dir,
// and shim sockets that exist right now.
func (c *Containerd) Leftovers() (Leftovers, error) {
	var l Leftovers
	exclude := []int{}
	if pid := c.Pid(); pid != 0 {
		exclude = append(exclude, pid)
	}
	ownMu.Lock()
	for pid := range own {
		exclude = append(exclude, pid)
	}
	ownMu.Unlock()
	liveMu.Lock()
	var others []*Containerd
	for o := range live {
		if o != c {
			others = append(others, o)
		}
	}
	liveMu.Unlock()
	if len(others) > 0 {
		all, err := listProcs()
		if err != nil {
			return l, err
		}
		for _, o := range others {
			if pid := o.Pid(); pid != 0 {
				exclude = append(exclude, pid)
			}
			for _, p := range all {
				if strings.Contains(p.Cmdline, o.Dir+"/") {
					exclude = append(exclude, p.Pid)
				}
			}
		}
	}
	procs, err := untrackedDescendants(exclude...)
	if err != nil {
		return l, err
	}
	l.Procs = procs
	if l.Mounts, err = mountsUnder(c.Dir); err != nil {
		return l, err
	}
	ents, err := os.ReadDir(c.SocketDir)
	if err != nil && !os.IsNotExist(err) {
		return l, err
	}
	for _, e := range ents {
		l.Sockets = append(l.Sockets, filepath.Join(c.SocketDir, e.Name()))
	}
	return l, nil
}

// WaitClean polls Leftovers until nothing is left or timeout passes, and returns the last result.
// With ignoreSockets, stale shim sockets do not count as "something left" for the wait (they are still
// reported).
func (c *Containerd) WaitClean(timeout time.Duration, ignoreSockets bool) (Leftovers, error) {
	deadline := time.Now().Add(timeout)
	for {
		l, err := c.Leftovers()
		clean := l.Empty() || (ignoreSockets && len(l.Procs) == 0 && len(l.Mounts) == 0)
		if err != nil || clean || time.Now().After(deadline) {
			return l, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// DeleteAll kills and deletes every task and container in every namespace through the daemon, the way
// a careful user would before stopping containerd.
func (c *Containerd) DeleteAll(ctx context.Context) error {
	cl, err := c.Client()
	if err != nil {
		return err
	}
	defer cl.Close()
	nss, err := cl.NamespaceService().List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		ctrs, err := cl.Containers(nctx)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, ctr := range ctrs {
			if task, err := ctr.Task(nctx, nil); err == nil {
				if _, err := task.Delete(nctx, containerd.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
					errs = append(errs, fmt.Errorf("deleting task %s/%s: %w", ns, ctr.ID(), err))
				}
			} else if !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("loading task %s/%s: %w", ns, ctr.ID(), err))
			}
			if err := ctr.Delete(nctx, containerd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("deleting container %s/%s: %w", ns, ctr.ID(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// Cleanup deletes every container, stops the daemon, and checks that nothing it started survives: no
// process, mount under Dir or shim socket. Whatever did survive is reported in the error and then
// removed anyway (processes killed by PID, mounts detached), and Dir is deleted, so one failing test does
// not poison the next.
func (c *Containerd) Cleanup(ctx context.Context) error {
	var errs []error
	t0 := time.Now()
	if c.Pid() != 0 {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		if err := c.DeleteAll(dctx); err != nil {
			errs = append(errs, fmt.Errorf("deleting containers: %w", err))
		}
		cancel()
	}
	t1 := time.Now()
	if err := c.stop(30 * time.Second); err != nil {
		errs = append(errs, err)
	}
	if c.opts.WarmStart == "pool" {
		// The warm-start pool daemon outlives shims (it exits when idle):
		// stop it by its pidfile, with the VMs it keeps ready.
		if err := vm.StopPool(filepath.Join(c.TemplateDir, "pool"), 30*time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	t2 := time.Now()
	// Shims exit on their own once their last task is deleted; give them (and their VMs) a moment.
	left, err := c.WaitClean(15*time.Second, false)
	if err != nil {
		errs = append(errs, err)
	}
	c.opts.Logf("cleanup: containers deleted in %v, containerd stopped in %v, clean after %v more",
		t1.Sub(t0).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond), time.Since(t2).Round(time.Millisecond))
	if !left.Empty() {
		errs = append(errs, fmt.Errorf("left behind after all containers were deleted and containerd stopped:\n%s", left))
		if still := KillProcs(left.Procs, 10*time.Second); len(still) > 0 {
			errs = append(errs, fmt.Errorf("processes survive SIGKILL: %v", still))
		}
	}
	if err := unmountAll(c.Dir); err != nil {
		errs = append(errs, err)
	}
	// runc leaves the namespace's parent cgroups behind (and a killed shim the container's).
	removeCgroups(c.Namespace)
	c.removeBridge()
	c.guard.release()
	liveMu.Lock()
	delete(live, c)
	liveMu.Unlock()
	if err := os.RemoveAll(c.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func withoutEnv(env []string, names ...string) []string {
	out := env[:0:0]
	for _, kv := range env {
		drop := false
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				drop = true
			}
		}
		if !drop {
			out = append(out, kv)
		}
	}
	return out
}
