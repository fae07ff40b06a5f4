package service

import (
	"context"
	"net"

	"github.com/macvm/macvm/pkg/guest"
	"github.com/macvm/macvm/pkg/vm"
)

// platformBackend runs container VMs under Virtualization.framework, in
// this process: there is no hypervisor binary to look up. The shim binary
// must carry the com.apple.security.virtualization entitlement (make shim
// signs it on macOS); without it the VM fails to validate in Create.
func platformBackend() backend {
	return backend{
		newMachine:       vm.NewVZ,
		lookupHypervisor: func(string) (string, string, error) { return "", "", nil },
		dialAgent: func(ctx context.Context, conn net.Conn, _ bool) (agentClient, error) {
			// vsock: every connection starts a session of its own, a
			// resumed guest's included.
			return guest.NewClient(ctx, conn)
		},
	}
}
