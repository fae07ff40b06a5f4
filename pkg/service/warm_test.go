package service

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"

	"github.com/macvm/macvm/pkg/guest"
	"github.com/macvm/macvm/pkg/guest/transport"
	"github.com/macvm/macvm/pkg/vm"
)

// setConfig makes later creates use the harness's kernel and initrd plus
// the config lines extra.
func (h *harness) setConfig(extra string) {
	h.t.Helper()
	body := fmt.Sprintf("kernel = %q\ninitrd = %q\n%s\n", filepath.Join(h.dir, "vmlinux"), filepath.Join(h.dir, "initrd.img"), extra)
	opts, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigBody: []byte(body)})
	if err != nil {
		h.t.Fatal(err)
	}
	h.opts = opts
}

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
	checkClonedThenCold(t, h, cfgs)
}

// checkClonedThenCold checks that a create made two VMs, a clone and then
// a cold boot with no template cache, stopped the clone and reseeded the
// VM it kept. Called with h.mu held (cfgs is guarded by it).
func checkClonedThenCold(t *testing.T, h *harness, cfgs []vm.Config) {
	t.Helper()
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
		t.Error("the cold VM was not reseeded")
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

// handshakeOnlyClone is a clone whose guest side completes the transport
// handshake (a real transport.Accept on the other end of its agent
// channel) and then never answers an RPC: its session reads the host's
// frames, but nothing serves them.
type handshakeOnlyClone struct {
	*fakeMachine
	t        *testing.T
	accepted chan struct{} // closed once the guest side has answered the SYNC
}

func (handshakeOnlyClone) StartMode() vm.StartMode { return vm.StartTemplate }

func (c handshakeOnlyClone) AgentConn(context.Context) (net.Conn, error) {
	host, guestEnd := net.Pipe()
	go func() {
		sess, err := transport.Accept(context.Background(), guestEnd)
		if err != nil {
			c.t.Errorf("guest side of the clone: %v", err)
			return
		}
		close(c.accepted)
		// The session's streams are accepted (so the host's writes do not
		// block) and never served.
		for {
			if _, _, err := sess.Accept(); err != nil {
				return
			}
		}
	}()
	go func() {
		<-c.done
		guestEnd.Close()
	}()
	return host, nil
}

// A clone whose agent completes the handshake and then never answers its
// first RPC is not a failed container either: after boot_timeout it is
// stopped, with a log line, and the VM boots cold.
func TestWarmStartSilentCloneAfterHandshakeBootsCold(t *testing.T) {
	h := newHarness(t, nil)
	h.setConfig(`boot_timeout = "2s"`)
	var (
		cfgs  []vm.Config
		clone handshakeOnlyClone
	)
	h.svc.backend.newMachine = func(cfg vm.Config) (vm.Machine, error) {
		m := &fakeMachine{cfg: cfg, done: make(chan struct{})}
		h.mu.Lock()
		defer h.mu.Unlock()
		h.machines = append(h.machines, m)
		cfgs = append(cfgs, cfg)
		if len(h.machines) == 1 {
			clone = handshakeOnlyClone{fakeMachine: m, t: t, accepted: make(chan struct{})}
			return clone, nil
		}
		return m, nil
	}
	h.svc.backend.dialAgent = func(ctx context.Context, conn net.Conn, resumed bool) (agentClient, error) {
		if !resumed {
			return h.agent, nil
		}
		return guest.NewClient(ctx, conn, transport.WithStaleSession())
	}
	start := time.Now()
	h.create("c1", nil)
	took := time.Since(start)

	select {
	case <-clone.accepted:
	default:
		t.Fatal("the clone's guest side never completed the handshake: the test did not test what it says")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	checkClonedThenCold(t, h, cfgs)
	if took < 2*time.Second {
		t.Errorf("the create took %v: the clone was given up before boot_timeout (2s)", took)
	}
}
