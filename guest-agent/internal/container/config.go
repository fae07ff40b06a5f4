package container

import (
	"encoding/json"
	"fmt"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/seccomp"
)

// HelperArg0 is the argv[0] under which the agent binary runs as the
// per-process helper (see RunHelper). It never appears on any command line a
// user writes; main dispatches on it.
const HelperArg0 = "macvm-container-helper"

// The helper's inherited descriptors.
const (
	// helperSyncFd is a SOCK_SEQPACKET socket: ready/start/error messages
	// and the pty master as SCM_RIGHTS.
	helperSyncFd = 3
	// helperConfigFd is a pipe carrying the JSON helperConfig to EOF.
	helperConfigFd = 4
	// helperNSFd is the first of the namespaces an exec's helper joins
	// itself (helperConfig.Join).
	helperNSFd = 5
)

// helperConfig is everything the helper needs, decided by the agent. For an
// init process it sets up the container (mounts, root, hostname); for an
// exec it only prepares the process inside the joined namespaces.
type helperConfig struct {
	// Init is set for a container's first process.
	Init bool `json:"init"`
	// Rootfs is the guest path of the container's root (init only).
	Rootfs string `json:"rootfs,omitempty"`
	// Spec is the container's OCI spec (init only); Process is the one to
	// run (the spec's for init, the request's for exec).
	Spec    *specs.Spec    `json:"spec,omitempty"`
	Process *specs.Process `json:"process"`
	// NewCgroupNS asks the helper to unshare the cgroup namespace once it
	// sits in its cgroup, so the container sees its cgroup as the root.
	NewCgroupNS bool `json:"new_cgroupns,omitempty"`
	// NewNetNS asks the helper to bring up loopback in its new namespace.
	NewNetNS bool `json:"new_netns,omitempty"`
	// Join lists the namespaces (of an exec) the helper enters itself, open
	// on helperNSFd, helperNSFd+1, ... (see helperJoined for why).
	Join []specs.LinuxNamespaceType `json:"join,omitempty"`
	// StdioFds, for a spare helper (spare.go), are the fds its stdio files
	// go to, in the order they follow on the sync socket.
	StdioFds []int `json:"stdio_fds,omitempty"`
	// Trace asks the helper for its steps' durations (helperTrace), the
	// first from TraceFrom (the agent's wall clock, Unix ns, as it began
	// to send the config).
	Trace     bool  `json:"trace,omitempty"`
	TraceFrom int64 `json:"trace_from,omitempty"`
	// Seccomp is the container's compiled linux.seccomp, for the init and
	// every exec (seccomp.go).
	Seccomp *seccomp.Program `json:"seccomp,omitempty"`
}

// helperMsg is one packet on the sync socket.
type helperMsg struct {
	// Type is "ready" (helper prepared, waits for start; a pty master
	// rides along when Terminal), "start" (agent: exec now) or "error".
	Type  string `json:"type"`
	Error string `json:"error,omitempty"`
	// Code classifies an error for the host (an errdefs class name).
	Code string `json:"code,omitempty"`
	// Trace is a "ready" helper's step durations, when asked for.
	Trace string `json:"trace,omitempty"`
}

// nsFlags maps OCI namespace types to clone flags. The cgroup namespace is
// left out on purpose: the helper unshares it after it has been placed in
// its cgroup, otherwise the namespace root would be the agent's cgroup.
var nsFlags = map[specs.LinuxNamespaceType]uintptr{
	specs.PIDNamespace:     unix.CLONE_NEWPID,
	specs.MountNamespace:   unix.CLONE_NEWNS,
	specs.UTSNamespace:     unix.CLONE_NEWUTS,
	specs.IPCNamespace:     unix.CLONE_NEWIPC,
	specs.NetworkNamespace: unix.CLONE_NEWNET,
}

// nsFiles are the /proc/PID/ns/ names of the namespace types.
var nsFiles = map[specs.LinuxNamespaceType]string{
	specs.PIDNamespace:     "pid",
	specs.MountNamespace:   "mnt",
	specs.UTSNamespace:     "uts",
	specs.IPCNamespace:     "ipc",
	specs.NetworkNamespace: "net",
	specs.CgroupNamespace:  "cgroup",
}

// nsJoin is a namespace entered with setns before the helper is forked.
type nsJoin struct {
	Type specs.LinuxNamespaceType
	Path string
}

// initNamespaces decides how the init process gets each namespace the spec
// lists: new ones become clone flags, ones with a path are joined. A mount
// namespace is always new: the agent's mounts must never change.
func initNamespaces(spec *specs.Spec) (cloneflags uintptr, join []nsJoin, newCgroup, newNet bool, err error) {
	cloneflags = unix.CLONE_NEWNS
	if spec.Linux == nil {
		return cloneflags, nil, false, false, nil
	}
	for _, ns := range spec.Linux.Namespaces {
		switch ns.Type {
		case specs.UserNamespace, specs.TimeNamespace:
			return 0, nil, false, false, fmt.Errorf("%s namespace: %w", ns.Type, errdefs.ErrNotImplemented)
		case specs.MountNamespace:
			if ns.Path != "" {
				return 0, nil, false, false, fmt.Errorf("joining a mount namespace (%s): %w", ns.Path, errdefs.ErrNotImplemented)
			}
			continue
		case specs.CgroupNamespace:
			if ns.Path == "" {
				newCgroup = true
			} else {
				join = append(join, nsJoin{ns.Type, ns.Path})
			}
			continue
		}
		flag, ok := nsFlags[ns.Type]
		if !ok {
			return 0, nil, false, false, fmt.Errorf("namespace type %q: %w", ns.Type, errdefs.ErrInvalidArgument)
		}
		if ns.Path == "" {
			cloneflags |= flag
			if ns.Type == specs.NetworkNamespace {
				newNet = true
			}
		} else {
			join = append(join, nsJoin{ns.Type, ns.Path})
		}
	}
	return cloneflags, join, newCgroup, newNet, nil
}

// parseSpec decodes and checks the parts of an OCI spec the agent relies on.
func parseSpec(b []byte) (*specs.Spec, error) {
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("decode OCI spec: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil {
		return nil, fmt.Errorf("OCI spec has no process: %w", errdefs.ErrInvalidArgument)
	}
	if err := checkProcess(spec.Process); err != nil {
		return nil, err
	}
	return &spec, nil
}

// parseProcess decodes an exec request's OCI process.
func parseProcess(b []byte) (*specs.Process, error) {
	var p specs.Process
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("decode OCI process: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := checkProcess(&p); err != nil {
		return nil, err
	}
	return &p, nil
}

func checkProcess(p *specs.Process) error {
	if len(p.Args) == 0 && p.CommandLine == "" {
		return fmt.Errorf("process has no args: %w", errdefs.ErrInvalidArgument)
	}
	if p.Cwd == "" {
		p.Cwd = "/"
	}
	if p.Capabilities != nil {
		for _, set := range [][]string{p.Capabilities.Bounding, p.Capabilities.Effective, p.Capabilities.Inheritable, p.Capabilities.Permitted, p.Capabilities.Ambient} {
			for _, c := range set {
				if _, ok := capabilities[c]; !ok {
					return fmt.Errorf("unknown capability %q: %w", c, errdefs.ErrInvalidArgument)
				}
			}
		}
	}
	for _, r := range p.Rlimits {
		if _, ok := rlimits[r.Type]; !ok {
			return fmt.Errorf("unknown rlimit %q: %w", r.Type, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// rlimits maps OCI rlimit names to resource numbers.
var rlimits = map[string]int{
	"RLIMIT_AS":         unix.RLIMIT_AS,
	"RLIMIT_CORE":       unix.RLIMIT_CORE,
	"RLIMIT_CPU":        unix.RLIMIT_CPU,
	"RLIMIT_DATA":       unix.RLIMIT_DATA,
	"RLIMIT_FSIZE":      unix.RLIMIT_FSIZE,
	"RLIMIT_LOCKS":      unix.RLIMIT_LOCKS,
	"RLIMIT_MEMLOCK":    unix.RLIMIT_MEMLOCK,
	"RLIMIT_MSGQUEUE":   unix.RLIMIT_MSGQUEUE,
	"RLIMIT_NICE":       unix.RLIMIT_NICE,
	"RLIMIT_NOFILE":     unix.RLIMIT_NOFILE,
	"RLIMIT_NPROC":      unix.RLIMIT_NPROC,
	"RLIMIT_RSS":        unix.RLIMIT_RSS,
	"RLIMIT_RTPRIO":     unix.RLIMIT_RTPRIO,
	"RLIMIT_RTTIME":     unix.RLIMIT_RTTIME,
	"RLIMIT_SIGPENDING": unix.RLIMIT_SIGPENDING,
	"RLIMIT_STACK":      unix.RLIMIT_STACK,
}
