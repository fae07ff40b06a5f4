package service

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/macvm/macvm/pkg/guest"
	"github.com/macvm/macvm/pkg/vm"
)

// PoolDaemonArg as the shim's first argument, followed by the pool
// directory, makes it the warm-start pool daemon (see RunPoolDaemon).
const PoolDaemonArg = "macvm-pool"

// poolDir is where the pool daemon of a template cache lives.
func poolDir(templateDir string) string { return filepath.Join(templateDir, "pool") }

func (c *Config) poolIdleTimeout() time.Duration {
	if d, err := time.ParseDuration(c.PoolIdleTimeout); err == nil && d > 0 {
		return d
	}
	return vm.DefaultPoolIdleTimeout
}

// pool is the pool a VM of this config is asked from first, or nil
// (warm_start is not "pool", or the backend has none).
func (c *Config) pool(ctx context.Context) *vm.PoolClient {
	if c.warmStart() != WarmPool {
		return nil
	}
	if runtime.GOOS != "linux" {
		log.G(ctx).Info("warm_start = \"pool\": the pool is QEMU-only; starting template clones")
		return nil
	}
	dir := poolDir(c.templateDir())
	pc := &vm.PoolClient{Dir: dir, Size: c.PoolSize, IdleTimeout: c.poolIdleTimeout()}
	pc.Spawn = func(cfg vm.Config) {
		spawnPoolDaemon(ctx, dir, vm.PoolJob{Config: cfg, Size: pc.Size, IdleTimeout: pc.IdleTimeout})
	}
	return pc
}

// spawnPoolDaemon starts this binary as the pool daemon of dir, detached
// like the template builder (own session, no parent-death signal, output
// appended to pool.log): it serves the shims that come after this one.
// Daemons racing for dir settle it with its lock (the losers exit).
func spawnPoolDaemon(ctx context.Context, dir string, job vm.PoolJob) {
	logger := log.G(ctx)
	exe, err := os.Executable()
	if err != nil {
		logger.WithError(err).Warn("warm start: cannot start the pool daemon")
		return
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		logger.WithError(err).Warn("warm start: pool directory")
		return
	}
	job.Config.Templates = nil
	b, err := json.Marshal(job)
	if err != nil {
		logger.WithError(err).Warn("warm start: pool job")
		return
	}
	logPath := filepath.Join(dir, "pool.log")
	if fi, err := os.Stat(logPath); err == nil && fi.Size() > maxBuildLog {
		os.Rename(logPath, logPath+".1")
	}
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		logger.WithError(err).Warn("warm start: pool log")
		return
	}
	defer out.Close()
	cmd := exec.Command(exe, PoolDaemonArg, dir)
	cmd.Stdin = bytes.NewReader(b)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		logger.WithError(err).Warn("warm start: cannot start the pool daemon")
		return
	}
	logger.WithField("pool_pid", cmd.Process.Pid).Info("warm start: no pool daemon answered; started one")
	go cmd.Wait()
}

// RunPoolDaemon is the pool daemon's main: dir is its directory (below
// the template cache, whose templates it clones), stdin the starting
// shim's vm.PoolJob (may be empty). SIGTERM or SIGINT stops it: the
// ready VMs go at once, the daemon exits when the VMs it handed out are
// gone. It returns the exit code.
func RunPoolDaemon(dir string, stdin io.Reader) int {
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s pid %d: %s\n", time.Now().UTC().Format(time.RFC3339Nano), os.Getpid(), fmt.Sprintf(format, args...))
	}
	if !filepath.IsAbs(dir) {
		logf("pool directory %q is not absolute", dir)
		return 2
	}
	var job *vm.PoolJob
	if b, err := io.ReadAll(stdin); err == nil && len(bytes.TrimSpace(b)) > 0 {
		job = &vm.PoolJob{}
		if err := json.Unmarshal(b, job); err != nil {
			logf("pool job: %v", err)
			return 2
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	tc := &vm.TemplateCache{Dir: filepath.Dir(dir), Ready: guest.TemplateWarm, Logf: logf}
	err := vm.RunPoolDaemon(ctx, dir, tc, guest.PoolWarm, job, logf)
	if errdefs.IsAlreadyExists(err) {
		return 0
	}
	if err != nil {
		logf("%v", err)
		return 1
	}
	return 0
}

// StopPoolDaemon stops the pool daemon of templateDir by the pid in its
// pidfile (SIGTERM, SIGKILL after timeout: VMs handed out outlive it) and
// reclaims what it left (vm.StopPool): VMs no shim holds are killed. No
// daemon is no error.
func StopPoolDaemon(templateDir string, timeout time.Duration) error {
	return vm.StopPool(poolDir(templateDir), timeout)
}

// PoolStopArg as the shim's first argument, followed by a template
// directory, stops that cache's pool daemon (RunPoolStop): `make
// pool-stop`.
const PoolStopArg = "macvm-pool-stop"

// poolStopTimeout is how long `macvm-pool-stop` lets the daemon wait for
// the VMs it handed out before it kills it: they outlive it, so there is
// no reason to wait for the containers.
const poolStopTimeout = 10 * time.Second

// RunPoolStop is PoolStopArg's main: it stops the pool daemon of
// templateDir and reclaims its VMs that no shim holds (StopPoolDaemon),
// reporting on stderr. It returns the exit code.
func RunPoolStop(templateDir string) int {
	if !filepath.IsAbs(templateDir) {
		fmt.Fprintf(os.Stderr, "template directory %q is not absolute\n", templateDir)
		return 2
	}
	if err := StopPoolDaemon(templateDir, poolStopTimeout); err != nil {
		fmt.Fprintf(os.Stderr, "stopping the pool daemon of %s: %v\n", templateDir, err)
		return 1
	}
	return 0
}
