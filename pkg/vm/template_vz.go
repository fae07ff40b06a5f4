package vm

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// Warm start under Virtualization.framework (macOS 14+, arm64): the
// framework saves a paused VM whole (RAM included) and restores it into a
// new VM of the same configuration. There is no copy-on-write RAM file as
// under QEMU, so a clone saves boot time but not memory. The lifecycle is
// plain Go over vzInstance, tested with the fake on any host. VMs with
// NICs and disks are templated as under QEMU: the template is booted with
// stand-ins of the same kinds (standin_vz.go) and NIC i has TemplateMAC(i)
// in the template and in every clone until the agent sets the container's.

// templateInputs is the plan with the per-VM paths, backends and MACs
// replaced as every backend's key does (templateShares, templateDisks,
// templateNICs), the guest architecture, and the boot files. The disks'
// virtio-blk serials follow their index and stay.
func (m *vzMachine) templateInputs() (templateInputs, error) {
	p := m.plan
	p.ConsolePath = "console"
	p.Shares = templateShares(m.plan.Shares)
	disks := make([]Disk, len(m.plan.Disks))
	for i, d := range m.plan.Disks {
		disks[i] = d.Disk
	}
	p.Disks = make([]vzDisk, len(disks))
	for i, d := range templateDisks(disks) {
		p.Disks[i] = vzDisk{Disk: d, ID: m.plan.Disks[i].ID}
	}
	p.NICs = templateNICs(m.plan.NICs)
	args := []string{"vz", runtime.GOARCH, fmt.Sprintf("%+v", p)}
	files := []string{m.plan.Kernel}
	if m.plan.Initrd != "" {
		files = append(files, m.plan.Initrd)
	}
	return templateInputs{args: args, files: files}, nil
}

// buildVZ is Build for Virtualization.framework.
// cfg's NICs need only their kinds: the template VM gets stand-ins
// (vzStandInNICs), and its disks stand-in images (vzStandInDisks).
func (tc *TemplateCache) buildVZ(ctx context.Context, cfg Config, create func(vzPlan) (vzInstance, error)) error {
	if len(cfg.NICs) > 0 {
		nics, release, err := vzStandInNICs(cfg.NICs)
		if err != nil {
			return fmt.Errorf("template for vm %s: %w", cfg.ID, err)
		}
		// After the template VM's stop (the boot below waits for it).
		defer release()
		cfg.NICs = nics
	}
	probe, err := newVZMachine(cfg, create)
	if err != nil {
		return err
	}
	in, err := probe.templateInputs()
	if err != nil {
		return err
	}
	// The saved state holds the RAM: recorded by identity, not hashed.
	return tc.build(ctx, cfg, in, func(ctx context.Context, tcfg Config, dir string) error {
		if err := vzStandInDisks(tcfg.Disks); err != nil {
			return err
		}
		m, err := newVZMachine(tcfg, create)
		if err != nil {
			return err
		}
		m.forTemplate = true
		if err := m.Start(ctx); err != nil {
			return err
		}
		defer func() {
			m.hardStop("template saved")
			select {
			case <-m.Done():
			case <-time.After(vzStopTimeout):
			}
		}()
		conn, err := m.AgentConn(ctx)
		if err != nil {
			return err
		}
		if tc.Ready != nil {
			release, err := tc.Ready(ctx, conn)
			if err != nil {
				return fmt.Errorf("template VM: %w; console: %s", err, m.ConsoleTail(vzConsoleTailBytes))
			}
			if release != nil {
				defer release()
			}
		}
		return m.save(ctx, filepath.Join(dir, templateState))
	}, false)
}

// save pauses the VM and saves its whole state to path.
func (m *vzMachine) save(ctx context.Context, path string) error {
	m.mu.Lock()
	inst := m.inst
	m.mu.Unlock()
	if inst == nil {
		return fmt.Errorf("vm %s: not started: %w", m.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	if err := callCtx(ctx, inst.Pause); err != nil {
		return fmt.Errorf("vm %s: pause for the template: %w", m.cfg.ID, err)
	}
	if err := callCtx(ctx, func() error { return inst.SaveState(path) }); err != nil {
		return fmt.Errorf("vm %s: save template state: %w", m.cfg.ID, err)
	}
	return nil
}

// warmVZ starts as a restored template when it can and boots cold
// otherwise; after Start it is whichever machine came up.
type warmVZ struct {
	cfg    Config
	create func(vzPlan) (vzInstance, error)

	mu  sync.Mutex // guards cur, which Start may replace once
	cur *vzMachine
}

func newWarmVZ(cfg Config, create func(vzPlan) (vzInstance, error)) (*warmVZ, error) {
	m, err := newVZMachine(cfg, create)
	if err != nil {
		return nil, err
	}
	return &warmVZ{cfg: cfg, create: create, cur: m}, nil
}

func (w *warmVZ) m() *vzMachine {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cur
}

// Start restores cfg's template if the cache holds a valid one; a
// missing or damaged template or a failed restore means a cold boot (and
// a rebuild), never a failed start.
func (w *warmVZ) Start(ctx context.Context) error {
	tc := w.cfg.Templates
	cold := w.m()
	in, err := cold.templateInputs()
	if err != nil {
		tc.logf("warm start: vm %s boots cold: %v", w.cfg.ID, err)
		return cold.Start(ctx)
	}
	key, _, err := in.key()
	if err != nil {
		tc.logf("warm start: vm %s boots cold: %v", w.cfg.ID, err)
		return cold.Start(ctx)
	}
	if r := tc.vzRefusals(key); r.Failures >= vzMaxRestoreFailures {
		tc.logf("warm start: vm %s boots cold: restoring template %s failed %d times on this system, last: %s (remove %s to try again)",
			w.cfg.ID, key, r.Failures, r.Error, tc.refusalPath(key))
		tc.discard(key) // one a racing builder saved meanwhile: never used
		return cold.Start(ctx)
	}
	if _, err := tc.validate(key); err != nil {
		if !errdefs.IsNotFound(err) {
			tc.logf("warm start: vm %s boots cold, rebuilding the template: %v", w.cfg.ID, err)
			tc.discard(key)
		}
		tc.miss(key, w.cfg)
		return cold.Start(ctx)
	}
	// The framework restores into the saved configuration only: the
	// clone's NICs carry the template's MACs (the agent sets the
	// container's), its disks and NICs are the container's own.
	ccfg := w.cfg
	ccfg.NICs = vzCloneNICs(w.cfg.NICs)
	clone, err := newVZMachine(ccfg, w.create)
	if err != nil {
		return err
	}
	clone.restorePath = filepath.Join(tc.dir(key), templateState)
	err = clone.Start(ctx)
	if err == nil {
		tc.touch(key)
		tc.clearVZRefusals(key)
		w.mu.Lock()
		w.cur = clone
		w.mu.Unlock()
		return nil
	}
	if ctx.Err() != nil {
		return err
	}
	tc.logf("warm start: vm %s: restoring template %s failed, cold boot: %v", w.cfg.ID, key, err)
	tc.discard(key)
	if cerr := cold.Start(ctx); cerr != nil {
		// Not the template's fault (a missing image, say): not counted.
		return cerr
	}
	// The template validated and the same configuration boots, so the
	// framework refused the template (see vz_refusals.go): it is rebuilt
	// a bounded number of times only.
	if r := tc.recordVZRefusal(key, err); r.Failures >= vzMaxRestoreFailures {
		tc.logf("warm start: template %s failed to restore %d times on this system: VMs of this configuration boot cold from now on (remove %s to try again)",
			key, r.Failures, tc.refusalPath(key))
		return nil
	}
	tc.logf("warm start: rebuilding template %s", key)
	tc.miss(key, w.cfg)
	return nil
}

func (w *warmVZ) StartMode() StartMode                            { return w.m().StartMode() }
func (w *warmVZ) AgentConn(ctx context.Context) (net.Conn, error) { return w.m().AgentConn(ctx) }
func (w *warmVZ) Pause(ctx context.Context) error                 { return w.m().Pause(ctx) }
func (w *warmVZ) Resume(ctx context.Context) error                { return w.m().Resume(ctx) }
func (w *warmVZ) Stop(ctx context.Context) error                  { return w.m().Stop(ctx) }
func (w *warmVZ) Done() <-chan struct{}                           { return w.m().Done() }
func (w *warmVZ) Err() error                                      { return w.m().Err() }
func (w *warmVZ) ConsoleTail(n int) string                        { return w.m().ConsoleTail(n) }
func (w *warmVZ) Pid() int                                        { return w.m().Pid() }
func (w *warmVZ) BootStarted() time.Time                          { return w.m().BootStarted() }

var _ Machine = (*warmVZ)(nil)
