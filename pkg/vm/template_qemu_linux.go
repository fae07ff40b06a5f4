package vm

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// NewQEMUMachine returns the machine for cfg: a cold-booting QEMU, or,
// when cfg.Templates is set, one that starts as a clone of cfg's template
// when there is a valid one and falls back to a cold boot otherwise.
func NewQEMUMachine(cfg Config) (Machine, error) {
	q, err := NewQEMU(cfg)
	if err != nil || cfg.Templates == nil {
		return q, err
	}
	return &warmQEMU{cfg: cfg, cur: q}, nil
}

// templateInputs is cfg's canonical command line: per-VM paths (state
// directory, shares' host directories) replaced by fixed placeholders, so
// two VMs of one boot configuration and device layout get one key whatever
// their containers. Shares, disks and NICs count as every backend's do
// (templateShares, templateDisks, templateNICs): the template is booted
// with empty stand-in disks (build), and the agent re-probes a disk it sees
// empty before mounting it.
func (q *QEMU) templateInputs() (templateInputs, error) {
	c := q.cfg
	c.Shares, c.Disks, c.NICs = templateShares(q.cfg.Shares), templateDisks(q.cfg.Disks), templateNICs(q.cfg.NICs)
	args, err := qemuArgs(c, qemuOptions{
		Arch: runtime.GOARCH, KVM: q.kvm, TSCKHz: q.tscKHz, ConsolePath: "console",
		QMPFD: childQMPFD, AgentFD: childAgentFD, NICFDs: nicFDs(len(c.NICs)), Paused: true, MemPath: templateMemory,
	})
	if err != nil {
		return templateInputs{}, err
	}
	files := []string{q.binary, q.cfg.Kernel}
	if q.cfg.Initrd != "" {
		files = append(files, q.cfg.Initrd)
	}
	return templateInputs{args: args, files: files}, nil
}

// Lookup returns the key of cfg's template if the cache holds a valid
// one; otherwise an error wrapping errdefs.ErrNotFound (none, or inputs
// changed), errdefs.ErrDataLoss (partial or damaged) or
// errdefs.ErrNotImplemented (a configuration templates cannot serve).
func (tc *TemplateCache) Lookup(cfg Config) (string, error) {
	q, err := NewQEMU(cfg)
	if err != nil {
		return "", err
	}
	return tc.lookup(q)
}

func (tc *TemplateCache) lookup(q *QEMU) (string, error) {
	in, err := q.templateInputs()
	if err != nil {
		return "", err
	}
	key, _, err := in.key()
	if err != nil {
		return "", err
	}
	if _, err := tc.validate(key); err != nil {
		return key, err
	}
	return key, nil
}

// restore loads a clone's template state (fd childStateFD) into the paused
// QEMU. RAM is not in the stream (x-ignore-shared): it is the template's
// memory file, mapped privately.
func (q *QEMU) restore(ctx context.Context) error { return restoreState(ctx, q.qmp) }

// restoreState loads the template state over the monitor mon (the VM's
// own, or the pool daemon's second one) and waits until the VM is paused.
func restoreState(ctx context.Context, mon *qmpClient) error {
	if _, err := mon.execute(ctx, "migrate-set-capabilities", ignoreShared); err != nil {
		return err
	}
	if _, err := mon.execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + strconv.Itoa(childStateFD)}); err != nil {
		return err
	}
	// A failed load makes QEMU exit; a finished one leaves it paused.
	for {
		raw, err := mon.execute(ctx, "query-status", nil)
		if err != nil {
			return fmt.Errorf("loading template state: %w", err)
		}
		var st struct {
			Status string `json:"status"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return fmt.Errorf("query-status: %w", err)
		}
		switch st.Status {
		case "inmigrate":
		case "paused", "postmigrate", "prelaunch":
			return nil
		default:
			return fmt.Errorf("after loading template state the VM is %q: %w", st.Status, errdefs.ErrFailedPrecondition)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("loading template state: %w", ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}

// save stops the VM and writes its device state to path; RAM stays in the
// shared memory file. The VM must not run again afterwards (its RAM file
// is the template's).
func (q *QEMU) save(ctx context.Context, path string) error {
	if _, err := q.qmp.execute(ctx, "migrate-set-capabilities", ignoreShared); err != nil {
		return err
	}
	if _, err := q.qmp.execute(ctx, "stop", nil); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := q.qmp.executeFD(ctx, "getfd", map[string]any{"fdname": "tmplstate"}, f); err != nil {
		return err
	}
	if _, err := q.qmp.execute(ctx, "migrate", map[string]any{"uri": "fd:tmplstate"}); err != nil {
		return err
	}
	for {
		raw, err := q.qmp.execute(ctx, "query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return fmt.Errorf("query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("saving template state: %s %s: %w", st.Status, st.ErrorDesc, errdefs.ErrFailedPrecondition)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("saving template state: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Build makes cfg's template unless a valid one exists: it boots the VM
// with its RAM in a shared file and without any share mounted, waits for
// Ready, and saves it. Only one process builds a key at a time; Build
// returns an error wrapping errdefs.ErrAlreadyExists when another one
// holds the lock (that one will finish it). cfg's NICs need only their
// kinds: the template VM gets stand-ins (standInNICs), never a
// container's backend or MAC.
func (tc *TemplateCache) Build(ctx context.Context, cfg Config) error {
	if len(cfg.NICs) > 0 {
		nics, release, err := standInNICs(cfg.NICs)
		if err != nil {
			return fmt.Errorf("template for vm %s: %w", cfg.ID, err)
		}
		defer release()
		cfg.NICs = nics
	}
	probe, err := NewQEMU(cfg)
	if err != nil {
		return err
	}
	in, err := probe.templateInputs()
	if err != nil {
		return err
	}
	// The device state is small: checksummed on every lookup.
	return tc.build(ctx, cfg, in, tc.boot, true)
}

// boot runs the template VM up to Ready and saves it into dir.
func (tc *TemplateCache) boot(ctx context.Context, cfg Config, dir string) error {
	q, err := NewQEMU(cfg)
	if err != nil {
		return err
	}
	q.memPath, q.memShared = filepath.Join(dir, templateMemory), true
	if err := q.Start(ctx); err != nil {
		return err
	}
	defer func() {
		// quit was sent (or the build failed): qemu goes now.
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		q.Stop(sctx)
	}()
	conn, err := q.AgentConn(ctx)
	if err != nil {
		return err
	}
	release := func() {}
	if tc.Ready != nil {
		r, err := tc.Ready(ctx, conn)
		if err != nil {
			conn.Close()
			return fmt.Errorf("template VM: %w; console: %s", err, q.ConsoleTail(consoleTailBytes))
		}
		if r != nil {
			release = r
		}
	}
	defer release()
	if err := q.save(ctx, filepath.Join(dir, templateState)); err != nil {
		return fmt.Errorf("template VM: %w", err)
	}
	// A template must never run again: its RAM is the shared file.
	q.qmp.execute(ctx, "quit", nil)
	select {
	case <-q.Done():
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// warmQEMU starts as a template clone when it can and as a cold boot
// otherwise; after Start it is whichever machine came up.
type warmQEMU struct {
	cfg Config

	mu  sync.Mutex // guards cur, which Start may replace once
	cur *QEMU
}

func (w *warmQEMU) m() *QEMU {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cur
}

// Start restores a clone of cfg's template if there is a valid one. A
// missing, stale or damaged template, or a restore that fails, means a
// cold boot (and a rebuild in the background): never a failed start.
func (w *warmQEMU) Start(ctx context.Context) error {
	tc := w.cfg.Templates
	cold := w.m()
	key, err := tc.lookup(cold)
	if key == "" {
		tc.logf("warm start: vm %s boots cold: %v", w.cfg.ID, err)
		return cold.Start(ctx)
	}
	if err != nil {
		if !errdefs.IsNotFound(err) {
			tc.logf("warm start: vm %s boots cold, rebuilding the template: %v", w.cfg.ID, err)
			tc.discard(key)
		}
		tc.miss(key, w.cfg)
		return cold.Start(ctx)
	}
	if tc.Pool != nil && !poolable(w.cfg) {
		// Pooled VMs are started ahead with stand-in NICs and disks:
		// the caller's network adopts the NICs (NIC.Adopt), the
		// disks' images are swapped in (swapPooledDisks). A NIC that
		// cannot adopt keeps the VM out of the pool.
		tc.logf("warm start: vm %s has %d NICs, %d of them adoptable (at most %d), which pooled VMs cannot serve: starting a template clone",
			w.cfg.ID, len(w.cfg.NICs), adoptable(w.cfg.NICs), maxPoolNICs)
	} else if tc.Pool != nil {
		pooled, err := tc.Pool.take(ctx, w.cfg, key)
		if err == nil {
			tc.touch(key)
			w.mu.Lock()
			w.cur = pooled
			w.mu.Unlock()
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		tc.logf("warm start: vm %s: no VM from the pool, starting a template clone: %v", w.cfg.ID, err)
	}
	clone, err := NewQEMU(w.cfg)
	if err != nil {
		return err
	}
	clone.memPath = filepath.Join(tc.dir(key), templateMemory)
	clone.statePath = filepath.Join(tc.dir(key), templateState)
	err = clone.Start(ctx)
	if err == nil {
		tc.touch(key)
		w.mu.Lock()
		w.cur = clone
		w.mu.Unlock()
		return nil
	}
	if ctx.Err() != nil {
		return err
	}
	tc.logf("warm start: vm %s: restoring template %s failed, cold boot and rebuild: %v", w.cfg.ID, key, err)
	tc.discard(key)
	tc.miss(key, w.cfg)
	return cold.Start(ctx)
}

func (w *warmQEMU) StartMode() StartMode                            { return w.m().StartMode() }
func (w *warmQEMU) AgentConn(ctx context.Context) (net.Conn, error) { return w.m().AgentConn(ctx) }
func (w *warmQEMU) Pause(ctx context.Context) error                 { return w.m().Pause(ctx) }
func (w *warmQEMU) Resume(ctx context.Context) error                { return w.m().Resume(ctx) }
func (w *warmQEMU) Stop(ctx context.Context) error                  { return w.m().Stop(ctx) }
func (w *warmQEMU) Done() <-chan struct{}                           { return w.m().Done() }
func (w *warmQEMU) Err() error                                      { return w.m().Err() }
func (w *warmQEMU) ConsoleTail(n int) string                        { return w.m().ConsoleTail(n) }
func (w *warmQEMU) Pid() int                                        { return w.m().Pid() }
func (w *warmQEMU) BootStarted() time.Time                          { return w.m().BootStarted() }
func (w *warmQEMU) ShareDirs() []string                             { return w.m().ShareDirs() }
func (w *warmQEMU) PoolDir() string                                 { return w.m().PoolDir() }

var _ Machine = (*warmQEMU)(nil)

// poolable tells whether a pooled VM can serve cfg: NICs (at most
// maxPoolNICs) that can adopt a pooled VM's stand-ins.
func poolable(cfg Config) bool {
	return len(cfg.NICs) <= maxPoolNICs && adoptable(cfg.NICs) == len(cfg.NICs)
}

func adoptable(nics []NIC) int {
	n := 0
	for _, nic := range nics {
		if nic.Adopt != nil && nic.Reclaim != nil {
			n++
		}
	}
	return n
}
