package service

import (
	"context"
	"net"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// agentClient is what the shim needs of a connection to a guest agent:
// the agent's RPCs plus named byte streams for stdio. pkg/guest.Client
// satisfies it; the tests use an in-process fake.
type agentClient interface {
	agent.AgentService
	// OpenStream opens a host->guest stream that an RPC then names in a
	// Stdio message.
	OpenStream(name string) (net.Conn, error)
	Close() error
	// Done is closed when the connection to the agent is gone.
	Done() <-chan struct{}
}

// backend is everything that touches a hypervisor or the wire. The
// production backend (backend_<os>.go) picks the platform's VM
// implementation; tests swap in fakes, which is what keeps pkg/service free
// of hypervisor code.
type backend struct {
	// newMachine builds (but does not start) a VM.
	newMachine func(cfg vm.Config) (vm.Machine, error)
	// lookupHypervisor resolves the configured hypervisor ("" for the
	// platform default) to what vm.Config.Hypervisor should say. When it is
	// missing, fix tells the operator how to get it.
	lookupHypervisor func(configured string) (path, fix string, err error)
	// dialAgent performs the handshake on a VM's agent channel and returns
	// the RPC client; resumed says the VM was restored from a warm-start
	// template (a clone, pooled or not), not booted.
	dialAgent func(ctx context.Context, conn net.Conn, resumed bool) (agentClient, error)
	// mounter performs the pod share's host mounts (nil: the real ones).
	mounter hostMounter
}
