package service

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/vm"
)

// silentClone is a VM restored from a template whose agent never answers
// (a template that passed its checks and is still wrong).
type silentClone struct{ *fakeMachine }

func (silentClone) StartMode() vm.StartMode { return vm.StartTemplate }
func (silentClone) AgentConn(context.Context) (net.Conn, error) {
	return nil, errors.New("agent silent")
}

// A clone whose agent does not answer is stopped and replaced by a cold
// boot of the same VM: the container is created, never failed for it; the
// second VM's config has no template cache. Every VM is reseeded.
func TestWarmStartCloneFallsBackToColdBoot(t *testing.T) {
	h := newHarness(t, nil)
	var cfgs []vm.Config
	h.svc.backend.newMachine = func(cfg vm.Config) (vm.Machine, error) {
		m := &fakeMachine{cfg: cfg, done: make(chan struct{})}
		h.mu.Lock()
		h.machines = append(h.machines, m)
		cfgs = append(cfgs, cfg)
		first := len(h.machines) == 1
		h.mu.Unlock()
		if first {
			return silentClone{m}, nil
		}
		return m, nil
	}
	h.create("c1", nil)
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(cfgs) != 2 {
		t.Fatalf("%d VMs made, want 2 (the clone, then a cold boot)", len(cfgs))
	}
	if cfgs[0].Templates == nil || cfgs[1].Templates != nil {
		t.Errorf("template caches: clone %v, fallback %v; want set, then none", cfgs[0].Templates, cfgs[1].Templates)
	}
	select {
	case <-h.machines[0].Done():
	default:
		t.Error("the silent clone was not stopped")
	}
	if !h.agent.called("Reseed") {
		t.Error("the VM was not reseeded")
	}
}

// A clone that cannot be reseeded must not run a container (it would
// share its template's random stream); a cold VM only logs it.
func TestReseedFailureFailsOnlyClones(t *testing.T) {
	h := newHarness(t, nil)
	sb := &sandbox{id: "c1"}
	for _, tt := range []struct {
		mode    vm.StartMode
		wantErr bool
	}{{vm.StartCold, false}, {vm.StartTemplate, true}} {
		h.agent.reseedErr = errdefs.ErrNotImplemented
		err := sb.reseed(h.ctx, h.agent, tt.mode)
		if (err != nil) != tt.wantErr {
			t.Errorf("reseed failure on a %s VM: %v, want error %v", tt.mode, err, tt.wantErr)
		}
	}
}
