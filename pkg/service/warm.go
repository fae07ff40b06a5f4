package service

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/macvm/macvm/pkg/guest"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// Warm start modes (config warm_start).
const (
	// WarmTemplate starts VMs as clones of a saved template of their boot
	// configuration; the first VM of a configuration boots cold and a
	// detached builder saves the template meanwhile.
	WarmTemplate = "template"
	// WarmPool is WarmTemplate plus a pool daemon (pool.go) that keeps
	// pool_size clones per template restored and paused ahead; a VM the
	// pool cannot give is a template clone (QEMU only: the vz backend
	// starts template clones).
	WarmPool = "pool"
	// WarmOff always boots cold.
	WarmOff = "off"
)

// DefaultTemplateDir keeps templates on disk, not in /run's tmpfs where
// it is one: the page cache keeps a hot template's memory file in RAM
// anyway, and can evict a cold one, which tmpfs cannot.
const DefaultTemplateDir = "/var/lib/macvm/templates"

// TemplateBuilderArg as the shim's only argument makes it the detached
// template builder (see RunTemplateBuilder).
const TemplateBuilderArg = "macvm-template-build"

// maxBuildLog is the size past which build.log starts over (one old
// copy is kept as build.log.1).
const maxBuildLog = 1 << 20

// templateBuildTimeout bounds a detached build (a boot and a save).
const templateBuildTimeout = 10 * time.Minute

// warmStart is the effective mode.
func (c *Config) warmStart() string {
	if c.WarmStart == "" {
		return WarmTemplate
	}
	return c.WarmStart
}

func (c *Config) templateDir() string {
	if c.TemplateDir != "" {
		return c.TemplateDir
	}
	return DefaultTemplateDir
}

// templates is the template cache a VM of this config starts from, or
// nil when warm start is off.
func (c *Config) templates(ctx context.Context) *vm.TemplateCache {
	if c.warmStart() == WarmOff {
		return nil
	}
	dir := c.templateDir()
	return &vm.TemplateCache{
		Dir:    dir,
		Ready:  guest.TemplateWarm,
		OnMiss: func(cfg vm.Config) { spawnTemplateBuilder(ctx, dir, cfg) },
		Logf:   log.G(ctx).Infof,
		Pool:   c.pool(ctx),
	}
}

// templateJob is what the shim hands its detached builder on stdin.
type templateJob struct {
	Dir    string    `json:"dir"`
	Config vm.Config `json:"config"`
}

// spawnTemplateBuilder starts this binary as a detached template builder:
// the shim of a short container exits long before a template is saved,
// and a builder tied to it would die with it. The builder is a session of
// its own with no parent-death signal; builders racing for one key settle
// it with the key's lock (the losers exit at once). Its output goes to
// build.log in the cache.
func spawnTemplateBuilder(ctx context.Context, dir string, cfg vm.Config) {
	logger := log.G(ctx)
	exe, err := os.Executable()
	if err != nil {
		logger.WithError(err).Warn("warm start: cannot start a template builder")
		return
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		logger.WithError(err).Warn("warm start: template cache")
		return
	}
	cfg.Templates = nil
	job, err := json.Marshal(templateJob{Dir: dir, Config: cfg})
	if err != nil {
		logger.WithError(err).Warn("warm start: template job")
		return
	}
	logPath := filepath.Join(dir, "build.log")
	if fi, err := os.Stat(logPath); err == nil && fi.Size() > maxBuildLog {
		os.Rename(logPath, logPath+".1") // keep one old log, bounded
	}
	out, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		logger.WithError(err).Warn("warm start: template build log")
		return
	}
	defer out.Close()
	cmd := exec.Command(exe, TemplateBuilderArg)
	cmd.Stdin = bytes.NewReader(job)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		logger.WithError(err).Warn("warm start: cannot start a template builder")
		return
	}
	logger.WithField("builder_pid", cmd.Process.Pid).Info("warm start: no template for this VM configuration yet; building one in the background")
	// Reap it if it ends while the shim lives (the shim has no reaper).
	go cmd.Wait()
}

// RunTemplateBuilder is the detached builder's main: it reads a
// templateJob from stdin and builds that template. It returns the exit
// code.
func RunTemplateBuilder(stdin io.Reader) int {
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%s pid %d: %s\n", time.Now().UTC().Format(time.RFC3339Nano), os.Getpid(), fmt.Sprintf(format, args...))
	}
	var job templateJob
	if err := json.NewDecoder(stdin).Decode(&job); err != nil {
		logf("template job: %v", err)
		return 2
	}
	// The VM's state directory is the builder's own (Build makes one).
	tc := &vm.TemplateCache{Dir: job.Dir, Ready: guest.TemplateWarm, Logf: logf}
	ctx, cancel := context.WithTimeout(context.Background(), templateBuildTimeout)
	defer cancel()
	start := time.Now()
	if err := tc.Build(ctx, job.Config); err != nil {
		logf("template for %s: %v", job.Config.ID, err)
		return 1
	}
	logf("template for %s ready after %v", job.Config.ID, time.Since(start).Round(time.Millisecond))
	return 0
}

// cloneAnswers is a clone's proof of life, run by boot right after the
// transport handshake: the clone's Reseed (which it needs before anything
// else anyway), bounded by boot_timeout. The handshake alone proves little
// for a clone: its agent resumed inside the session of the template build
// or of the pool's warm-up, and the handshake shows that the guest's
// transport read the host's SYNC and answered, not that the new session
// then serves RPCs. Seen once under TCG: a clone answered the handshake and
// then never its first RPC; with nothing bounding that wait but the
// create's own timeout, the container failed instead of booting cold.
// Any failure here (no answer in time, or an error) makes boot replace the
// clone by a cold boot. The wait costs the clone one round trip before
// Create goes on with the host's share mounts, which otherwise overlap it.
func (sb *sandbox) cloneAnswers(ctx context.Context, client agentClient) error {
	timeout := sb.cfg.bootTimeout()
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	mode := vm.StartModeOf(sb.machine)
	err := sb.reseed(actx, client, mode)
	switch {
	case err == nil:
		sb.reseeded = true
		return nil
	case actx.Err() != nil && ctx.Err() == nil:
		diag := ""
		if d, ok := client.(interface{ Diagnose(context.Context) string }); ok {
			diag = "; " + d.Diagnose(ctx)
		}
		return fmt.Errorf("%s clone: its agent completed the handshake but did not answer its first RPC (Reseed) within %v (boot_timeout)%s: %w; console: %s",
			mode, timeout, diag, context.DeadlineExceeded, sb.machine.ConsoleTail(2048))
	default:
		return fmt.Errorf("%s clone: reseed: %w", mode, err)
	}
}

// reseedBytes is how much host entropy a VM gets at start.
const reseedBytes = 64

// reseed gives the guest fresh host entropy and makes its kernel reseed,
// on every VM (cheap): a clone must not share its template's random
// stream, so for a clone a failure fails the create; a cold-booted VM
// has its own entropy and only logs it (e.g. an older agent).
func (sb *sandbox) reseed(ctx context.Context, client agentClient, mode vm.StartMode) error {
	entropy := make([]byte, reseedBytes)
	if _, err := rand.Read(entropy); err != nil {
		return err
	}
	_, err := client.Reseed(ctx, &agent.ReseedRequest{Entropy: entropy})
	if err != nil && mode == vm.StartCold {
		log.G(ctx).WithError(err).WithField("container_id", sb.id).Warn("reseed guest RNG")
		return nil
	}
	return err
}
