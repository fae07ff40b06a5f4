package service

import (
	"context"
	"fmt"
	"net"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/guest"
	"github.com/macvm/macvm/pkg/vm"
)

// platformBackend would run container VMs under Virtualization.framework,
// which lives in this process (no hypervisor binary to look up). Until
// pkg/vm has that backend, Create fails with a clear error rather than a
// NotImplemented, which containerd would take as "speak task API v2".
func platformBackend() backend {
	return backend{
		newMachine: func(cfg vm.Config) (vm.Machine, error) {
			return nil, fmt.Errorf("vm %s: the Virtualization.framework backend is not built yet: %w", cfg.ID, errdefs.ErrUnavailable)
		},
		lookupHypervisor: func(string) (string, string, error) { return "", "", nil },
		dialAgent: func(ctx context.Context, conn net.Conn) (agentClient, error) {
			return guest.NewClient(ctx, conn)
		},
	}
}
