package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/macvm/macvm/e2e/harness"
	"github.com/macvm/macvm/pkg/vm"
)

// Namespace is the containerd namespace the benchmark works in.
const Namespace = "bench"

// variant is one runtime configuration under test: runc, or macvm with a
// given kernel.
type variant struct {
	info VariantInfo
	rt   harness.Runtime
	// configPath is the macvm shim's config file (its kernel and initrd),
	// passed as runtime options, so two macvm variants share one containerd.
	configPath string
	// templateDir is where the shim keeps its warm-start templates; set
	// only for variants with warm_start = "template" or "pool".
	templateDir string
	// poolSize is the pool_size of a warm_start = "pool" variant.
	poolSize int
}

// benchPoolSize is the macvm-pool variant's pool_size: the `run` step
// starts one container at a time, and a pool of two refills between
// them; the density step's burst mostly falls back to template clones.
const benchPoolSize = 2

func (v *variant) vm() bool { return v.rt.VM }

// bench is one benchmark run against one private containerd.
type bench struct {
	cfg      config
	cd       *harness.Containerd
	variants []*variant
	res      *Results
	events   *eventRecorder
	// nerdctl is set when the networked start is measured.
	nerdctl *nerdctlSetup

	// mu guards seq.
	mu  sync.Mutex
	seq int
}

// run sets up the daemon, runs the selected measurements and writes the
// results; it returns the path of the Markdown report.
func run(ctx context.Context, cfg config) (string, error) {
	paths, err := resolvePaths(cfg.binDir, cfg.bootDir)
	if err != nil {
		return "", err
	}
	snapDir, err := os.MkdirTemp("", "mvm-bench-")
	if err != nil {
		return "", err
	}
	// The benchmark keeps measuring the binaries it started with, even if
	// someone rebuilds _output/ during the run; the snapshot's guardian
	// also cleans up should this process be killed.
	snap, release, err := paths.Snapshot(snapDir)
	if err != nil {
		os.RemoveAll(snapDir)
		return "", fmt.Errorf("snapshot of the build outputs: %w", err)
	}
	defer release()
	for _, f := range []string{"containerd-shim-runc-v2", "containerd-shim-macvm-v1"} {
		if _, err := os.Stat(filepath.Join(snap.BinDir, f)); err != nil {
			return "", fmt.Errorf("%s missing in %s: run `make shim containerd`", f, paths.BinDir)
		}
	}
	for _, f := range []string{"vmlinux", "initrd.img"} {
		if _, err := os.Stat(filepath.Join(snap.BootDir, f)); err != nil {
			return "", fmt.Errorf("%s missing in %s: run `make boot`", f, paths.BootDir)
		}
	}

	machine, err := probeMachine(paths.BinDir)
	if err != nil {
		return "", err
	}
	res := &Results{Machine: machine, Mode: cfg.mode.Name}

	logf("starting a private containerd")
	cd, err := harness.Start(ctx, harness.Options{Paths: snap, Namespace: Namespace, Debug: true})
	if err != nil {
		return "", err
	}
	b := &bench{cfg: cfg, cd: cd, res: res}
	defer func() {
		logf("cleaning up")
		cctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if cfg.keep {
			keep := filepath.Join(os.TempDir(), fmt.Sprintf("macvm-bench-%d.log", os.Getpid()))
			if err := copyFileTo(cd.LogPath, keep); err == nil {
				logf("containerd log kept at %s", keep)
			}
		}
		// The pool daemon outlives shims: stop it (and its ready VMs)
		// before the harness looks for processes left behind.
		for _, v := range b.variants {
			if v.poolSize > 0 {
				if err := vm.StopPool(filepath.Join(v.templateDir, "pool"), time.Minute); err != nil {
					logf("cleanup: %v", err)
				}
			}
		}
		if err := cd.Cleanup(cctx); err != nil {
			logf("cleanup: %v", err)
		}
		b.cleanupNerdctl()
	}()
	if err := cd.ImportBusybox(ctx); err != nil {
		return "", err
	}
	if b.events, err = recordEvents(ctx, cd); err != nil {
		return "", err
	}
	defer b.events.stop()

	if err := b.setupVariants(snap, snapDir); err != nil {
		return "", err
	}
	for _, v := range b.variants {
		res.Variants = append(res.Variants, v.info)
	}
	if cfg.wants("net") {
		if err := b.setupNerdctl(paths.BinDir, snap.BinDir, snapDir); err != nil {
			return "", err
		}
	}
	if err := b.warmUp(ctx); err != nil {
		return "", err
	}

	steps := []struct {
		name string
		f    func(context.Context) error
	}{
		{"run", b.measureRun},
		{"output", b.measureFirstOutput},
		{"net", b.measureNet},
		{"exec", b.measureExecAndStreams},
		{"density", b.measureDensity},
		{"micro", b.measureMicro},
	}
	for _, s := range steps {
		if !cfg.wants(s.name) && !(s.name == "exec" && (cfg.wants("stream") || cfg.wants("memory"))) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return "", err
		}
		logf("== %s", s.name)
		if err := s.f(ctx); err != nil {
			// One broken measurement must not throw away the others: it
			// shows in the report as a note, and the run fails at the end.
			res.Failures = append(res.Failures, fmt.Sprintf("%s: %v", s.name, err))
			logf("%s failed: %v", s.name, err)
		}
	}
	res.Machine.LoadEnd = loadAvg()
	path, err := writeResults(cfg.outDir, res)
	if err != nil {
		return "", err
	}
	fmt.Println(renderMarkdown(res))
	if cfg.readme != "" {
		rel, err := filepath.Rel(filepath.Dir(cfg.readme), path)
		if err != nil {
			rel = path
		}
		if err := updateReadme(cfg.readme, res, filepath.ToSlash(rel)); err != nil {
			return path, err
		}
	}
	if len(res.Failures) > 0 {
		return path, fmt.Errorf("%d measurement(s) failed (see %s): %s", len(res.Failures), path, strings.Join(res.Failures, "; "))
	}
	return path, nil
}

// resolvePaths makes the build output directories absolute.
func resolvePaths(binDir, bootDir string) (harness.Paths, error) {
	var p harness.Paths
	var err error
	if p.BinDir, err = filepath.Abs(binDir); err != nil {
		return p, err
	}
	if p.BootDir, err = filepath.Abs(bootDir); err != nil {
		return p, err
	}
	for _, f := range []string{"containerd", "ctr"} {
		if _, err := os.Stat(filepath.Join(p.BinDir, f)); err != nil {
			return p, fmt.Errorf("%s: run `make containerd`", err)
		}
	}
	return p, nil
}

// setupVariants lists runc, macvm with the default boot files booting
// cold, the same started from a warm-start template (unless -warm=false),
// and macvm with the minimal kernel (cold) when its boot files exist.
func (b *bench) setupVariants(snap harness.Paths, snapDir string) error {
	b.variants = append(b.variants, &variant{
		info: VariantInfo{Name: "runc", Runtime: harness.RuncName},
		rt:   harness.Runc(),
	})
	add := func(name, bootDir, warm string) error {
		kernel, err := kernelVersion(filepath.Join(bootDir, "vmlinux"))
		if err != nil {
			return err
		}
		cfgPath := filepath.Join(snapDir, name+".toml")
		templateDir, extra, poolSize := "", "", 0
		switch warm {
		case "template":
			templateDir = filepath.Join(snapDir, "templates-"+name)
		case "pool":
			// The same template as macvm-template (one build less).
			templateDir = filepath.Join(snapDir, "templates-macvm-template")
			poolSize = benchPoolSize
			extra = fmt.Sprintf("pool_size = %d\n", poolSize)
		}
		if err := harness.WriteMacvmConfigExtra(cfgPath, harness.Paths{BootDir: bootDir}, warm, templateDir, extra); err != nil {
			return err
		}
		// Ten TCG guests booting at once on two busy cores can take longer
		// than the default 60 s boot timeout; the density figure is the
		// time they take, so the bound is raised rather than failing it.
		if err := appendFile(cfgPath, fmt.Sprintf("boot_timeout = %q\n", benchBootTimeout)); err != nil {
			return err
		}
		b.variants = append(b.variants, &variant{
			info:        VariantInfo{Name: name, Runtime: harness.MacvmName, Kernel: kernel, BootDir: bootDir, WarmStart: warm},
			rt:          harness.Macvm(),
			configPath:  cfgPath,
			templateDir: templateDir,
			poolSize:    poolSize,
		})
		return nil
	}
	if err := add("macvm", snap.BootDir, "off"); err != nil {
		return err
	}
	if b.cfg.warm {
		if err := add("macvm-template", snap.BootDir, "template"); err != nil {
			return err
		}
		if err := add("macvm-pool", snap.BootDir, "pool"); err != nil {
			return err
		}
	}
	if b.cfg.minimalDir == "" {
		return nil
	}
	minimal, err := filepath.Abs(b.cfg.minimalDir)
	if err != nil {
		return err
	}
	if !exists(filepath.Join(minimal, "vmlinux")) || !exists(filepath.Join(minimal, "initrd.img")) {
		logf("no minimal-kernel boot files in %s (make boot-minimal): measuring the default kernel only", minimal)
		return nil
	}
	// A private copy, like the default boot files: a rebuild mid-run must not change what is measured.
	dst := filepath.Join(snapDir, "boot-minimal")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	for _, f := range []string{"vmlinux", "initrd.img"} {
		if err := copyFileTo(filepath.Join(minimal, f), filepath.Join(dst, f)); err != nil {
			return err
		}
	}
	return add("macvm-minimal", dst, "off")
}

// templateWait bounds the wait for a variant's first template: a cold
// boot under TCG on a busy machine, then saving the guest's RAM.
const templateWait = 10 * time.Minute

// warmUp makes every template variant's template before anything is
// measured: one `ctr run --rm` boots cold and starts the shim's detached
// template builder, and the benchmark waits for the template's manifest
// (written last). Measurements then see the steady state: clones.
func (b *bench) warmUp(ctx context.Context) error {
	for _, v := range b.variants {
		if v.templateDir == "" {
			continue
		}
		logf("warm-up: %s builds its template", v.info.Name)
		if _, err := b.ctr(ctx, nil, b.runArgs(v, []string{"--rm"}, b.id(v, "warmup"), "true")...); err != nil {
			return fmt.Errorf("warm-up of %s: %w", v.info.Name, err)
		}
		deadline := time.Now().Add(templateWait)
		for !hasTemplate(v.templateDir) {
			if time.Now().After(deadline) {
				log, _ := os.ReadFile(filepath.Join(v.templateDir, "build.log"))
				return fmt.Errorf("warm-up of %s: no template after %v; build log:\n%s", v.info.Name, templateWait, log)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(500 * time.Millisecond):
			}
		}
		logf("warm-up: %s has its template", v.info.Name)
		if v.poolSize > 0 {
			if err := b.fillPool(ctx, v); err != nil {
				return err
			}
		}
	}
	return nil
}

// fillPool starts a pool variant's daemon (the first run with a template
// does) and waits until its pool is full, so the measurements see the
// steady state: VMs taken from the pool.
func (b *bench) fillPool(ctx context.Context, v *variant) error {
	if _, err := b.ctr(ctx, nil, b.runArgs(v, []string{"--rm"}, b.id(v, "warmup-pool"), "true")...); err != nil {
		return fmt.Errorf("warm-up of %s: %w", v.info.Name, err)
	}
	return b.waitPoolKeys(ctx, v, 1)
}

// waitPoolKeys waits until v's pool daemon serves keys keys, each with
// poolSize VMs ready.
func (b *bench) waitPoolKeys(ctx context.Context, v *variant, keys int) error {
	dir := filepath.Join(v.templateDir, "pool")
	deadline := time.Now().Add(templateWait)
	for {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := vm.PoolStatus(sctx, dir)
		cancel()
		full := 0
		for _, k := range st {
			if k.Ready >= v.poolSize {
				full++
			}
		}
		if full >= keys {
			logf("warm-up: %s's pool is full for %d keys: %v", v.info.Name, full, st)
			return nil
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "pool.log"))
			return fmt.Errorf("warm-up of %s: pool not full for %d keys after %v (%v %v); pool log:\n%s", v.info.Name, keys, templateWait, st, err, log)
		}
		if err := sleepCtx(ctx, 500*time.Millisecond); err != nil {
			return err
		}
	}
}

// hasTemplate reports whether dir holds a finished template (the shim
// writes a template's manifest.json last; dot-directories are builds).
func hasTemplate(dir string) bool {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") && exists(filepath.Join(dir, e.Name(), "manifest.json")) {
			return true
		}
	}
	return false
}

// benchBootTimeout is the macvm variants' boot_timeout (see setupVariants),
// and ctrTimeout bounds every ctr call.
const (
	benchBootTimeout = "5m"
	ctrTimeout       = 6 * time.Minute
)

func appendFile(path, text string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(text); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func copyFileTo(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// nextSeq returns a number no other call of this run returns.
func (b *bench) nextSeq() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	return b.seq
}

// id returns a fresh container id for variant v and purpose what.
func (b *bench) id(v *variant, what string) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	return fmt.Sprintf("%s-%s-%d", v.info.Name, what, b.seq)
}

// runArgs builds `ctr run` arguments for v.
func (b *bench) runArgs(v *variant, extra []string, id string, cmd ...string) []string {
	args := []string{"run", "--runtime", v.rt.Name}
	if v.configPath != "" {
		args = append(args, "--runtime-config-path", v.configPath)
	}
	args = append(args, extra...)
	args = append(args, harness.BusyboxImage, id)
	return append(args, cmd...)
}

// timedWriter records when the first and the last byte arrived and how many.
type timedWriter struct {
	// mu guards the fields below: os/exec writes from its copy goroutine
	// while the caller may read.
	mu          sync.Mutex
	first, last time.Time
	n           int64
	keep        *bytes.Buffer // the first bytes, for checks and error messages
}

func (w *timedWriter) Write(p []byte) (int, error) {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n == 0 && len(p) > 0 {
		w.first = now
	}
	w.last = now
	w.n += int64(len(p))
	if w.keep == nil {
		w.keep = &bytes.Buffer{}
	}
	if room := 4096 - w.keep.Len(); room > 0 {
		w.keep.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}

func (w *timedWriter) snapshot() (first, last time.Time, n int64, head string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.keep != nil {
		head = w.keep.String()
	}
	return w.first, w.last, w.n, head
}

// ctrRun is one timed ctr invocation.
type ctrRun struct {
	start, end time.Time
	stdout     *timedWriter
	stderr     bytes.Buffer
	exitCode   int
	// cpu is the user+system CPU time ctr itself used.
	cpu time.Duration
}

func (r *ctrRun) wall() time.Duration { return r.end.Sub(r.start) }

// ctr runs ctr with stdin (nil for none), timing it from just before the
// fork to its exit. A non-zero exit is an error that carries stderr.
func (b *bench) ctr(ctx context.Context, stdin io.Reader, args ...string) (*ctrRun, error) {
	// A hung create (seen once with ten VMs booting at once) must fail the
	// measurement, not the whole run: no single ctr call takes longer than
	// a boot timeout plus a minute.
	ctx, cancel := context.WithTimeout(ctx, ctrTimeout)
	defer cancel()
	cmd := b.cd.CtrCommand(ctx, args...)
	r := &ctrRun{stdout: &timedWriter{}}
	cmd.Stdout = r.stdout
	cmd.Stderr = &r.stderr
	if stdin != nil {
		cmd.Stdin = stdin
	}
	r.start = time.Now()
	err := harness.RunCmd(cmd)
	r.end = time.Now()
	if cmd.ProcessState != nil {
		r.cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		return r, nil
	case errors.As(err, &ee):
		r.exitCode = ee.ExitCode()
		return r, fmt.Errorf("ctr %s: exit %d: %s", strings.Join(args, " "), r.exitCode, strings.TrimSpace(harness.Filtered(r.stderr.Bytes())))
	default:
		return r, fmt.Errorf("ctr %s: %w", strings.Join(args, " "), err)
	}
}

// rotate returns the variants starting at index i: each round starts with
// another runtime, so neither always runs first (cold caches) or right
// after the other's teardown.
func (b *bench) rotate(i int) []*variant {
	n := len(b.variants)
	out := make([]*variant, 0, n)
	for k := 0; k < n; k++ {
		out = append(out, b.variants[(i+k)%n])
	}
	return out
}
