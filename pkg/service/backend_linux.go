package service

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"runtime"

	"github.com/macvm/macvm/pkg/guest"
	"github.com/macvm/macvm/pkg/guest/transport"
	"github.com/macvm/macvm/pkg/vm"
)

// platformBackend runs container VMs under QEMU.
func platformBackend() backend {
	return backend{
		newMachine: func(cfg vm.Config) (vm.Machine, error) {
			// A cold-booting QEMU, or one that starts from a template
			// when cfg.Templates is set.
			m, err := vm.NewQEMUMachine(cfg)
			if err != nil {
				return nil, err
			}
			return m, nil
		},
		lookupHypervisor: lookupQEMU,
		dialAgent: func(ctx context.Context, conn net.Conn, resumed bool) (agentClient, error) {
			// A resumed guest's agent is inside the session of the
			// template build or the pool's warm-up (virtio-serial: it
			// never saw that host go).
			var opts []transport.Option
			if resumed {
				opts = append(opts, transport.WithStaleSession())
			}
			return guest.NewClient(ctx, conn, opts...)
		},
	}
}

// lookupQEMU finds the QEMU system emulator for the host architecture
// unless the config names one.
func lookupQEMU(configured string) (string, string, error) {
	name, pkg := vm.DefaultQEMU, "qemu-system-x86"
	if runtime.GOARCH == "arm64" {
		name, pkg = "qemu-system-aarch64", "qemu-system-arm"
	}
	if configured != "" {
		name = configured
	}
	path, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Sprintf("install it (apt-get install %s)", pkg), fmt.Errorf("%s not found: %w", name, err)
	}
	return path, "", nil
}
