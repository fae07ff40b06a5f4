package container

import (
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/macvm/macvm/guest-agent/internal/seccomp"
)

// compileSeccomp compiles the container's linux.seccomp when it is created,
// in the agent: a profile the guest cannot enforce fails the create (a
// security profile that was asked for is never dropped), and the init and
// every exec get the same compiled filter.
func compileSeccomp(spec *specs.Spec) (*seccomp.Program, error) {
	if spec.Linux == nil || spec.Linux.Seccomp == nil {
		return nil, nil
	}
	p, err := seccomp.Compile(spec.Linux.Seccomp)
	if err != nil {
		return nil, fmt.Errorf("linux.seccomp: %w", err)
	}
	return p, nil
}

// seccompBeforeCaps installs the filter of a process without
// no_new_privs, in the helper, before setupProcess drops capabilities:
// seccomp(2) then needs CAP_SYS_ADMIN, and the filter also covers the
// helper's remaining setup (runc does the same).
func seccompBeforeCaps(cfg *helperConfig) error {
	if cfg.Seccomp == nil || cfg.Process.NoNewPrivileges {
		return nil
	}
	return seccomp.Install(cfg.Seccomp)
}

// seccompBeforeExec installs the filter of a process with no_new_privs
// (set already) right before execve, so that as few of the helper's own
// syscalls as possible run under it.
func seccompBeforeExec(p *specs.Process, prog *seccomp.Program) error {
	if prog == nil || !p.NoNewPrivileges {
		return nil
	}
	return seccomp.Install(prog)
}
