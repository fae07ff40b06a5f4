package service

import (
	"fmt"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// The CRI annotations that make a pod (containerd's
// internal/cri/annotations): every container of a pod carries its
// sandbox's ID, the sandbox (pause) container carries its pod's resources.
const (
	annotationSandboxID     = "io.kubernetes.cri.sandbox-id"
	annotationContainerType = "io.kubernetes.cri.container-type"
	annotationCPUPeriod     = "io.kubernetes.cri.sandbox-cpu-period"
	annotationCPUQuota      = "io.kubernetes.cri.sandbox-cpu-quota"
	annotationMemory        = "io.kubernetes.cri.sandbox-memory"
)

// shimGroup is what the manager keys the shim's socket on: the pod's
// sandbox ID, so that every container of a pod reaches the one shim (and
// VM) of the pod; a container without one is a pod of its own.
func shimGroup(id string, annotations map[string]string) string {
	if g := annotations[annotationSandboxID]; g != "" {
		return g
	}
	return id
}

// guestShm is how a container's /dev/shm reaches the guest: a tmpfs the
// agent shares between the containers of one IPC namespace. CRI binds a
// host directory there (the sandbox's shm), which through the share would
// be a different filesystem in each container: the guest's own tmpfs
// replaces it.
var guestShm = specs.Mount{
	Destination: "/dev/shm",
	Type:        "tmpfs",
	Source:      "shm",
	Options:     []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"},
}

var procNSPath = regexp.MustCompile(`^/proc/([0-9]+)/ns/([a-z]+)$`)

// podNamespaces rewrites the guest spec's namespaces for the pod VM:
//
//   - the network namespace is the VM itself (the pod's network): the guest
//     spec never carries one, and every container of the pod sees the VM's
//     network;
//   - a namespace named by path must be /proc/<pid>/ns/<type> with <pid> a
//     task of this pod, as the shim reported it (the guest pid of its init):
//     it then names that init's namespace inside the VM. initPid resolves a
//     reported pid to the container that has it ("" if none);
//   - a path naming the host's PID, IPC, UTS or cgroup namespace (PID 1's
//     or the shim's own) maps to the VM's own namespace of that
//     type, the VM being the container's host. Any other path names
//     something outside the VM and is refused.
//
// /dev/shm becomes the guest tmpfs the agent shares along with the IPC
// namespace (see useGuestShm).
func podNamespaces(gs *specs.Spec, initPid func(pid uint32) string) error {
	if gs.Linux == nil {
		return nil
	}
	var out []specs.LinuxNamespace
	joinsIPC := false
	for _, ns := range gs.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			continue
		}
		if ns.Path == "" {
			out = append(out, ns)
			continue
		}
		m := procNSPath.FindStringSubmatch(path.Clean(ns.Path))
		if m == nil {
			return fmt.Errorf("%s namespace %q: only /proc/<pid>/ns/<type> of a task of this pod can be joined in its VM: %w",
				ns.Type, ns.Path, errdefs.ErrInvalidArgument)
		}
		pid, err := strconv.ParseUint(m[1], 10, 32)
		if err != nil || pid == 0 {
			return fmt.Errorf("%s namespace %q: bad pid: %w", ns.Type, ns.Path, errdefs.ErrInvalidArgument)
		}
		owner := initPid(uint32(pid))
		if owner == "" && hostInitNamespace(ns.Path, ns.Type) {
			// The host's own namespace (`ctr run --with-ns pid:/proc/1/ns/pid`,
			// nerdctl --pid=host): its counterpart is the VM's own, which a
			// container gets by naming no namespace of that type.
			continue
		}
		if owner == "" {
			return fmt.Errorf("%s namespace %q: pid %d is no running task of this pod (its VM runs the pod's containers only): %w",
				ns.Type, ns.Path, pid, errdefs.ErrInvalidArgument)
		}
		// The reported pid is the guest pid of the owner's init: the same
		// path names the namespace inside the VM.
		out = append(out, specs.LinuxNamespace{Type: ns.Type, Path: fmt.Sprintf("/proc/%d/ns/%s", pid, m[2])})
		if ns.Type == specs.IPCNamespace {
			joinsIPC = true
		}
	}
	gs.Linux.Namespaces = out
	useGuestShm(gs, joinsIPC)
	return nil
}

// useGuestShm makes the spec's /dev/shm the guest tmpfs (see guestShm)
// when it is a bind of a host directory (CRI's sandbox shm, for the
// sandbox and the containers joining its IPC namespace alike), or missing
// in a container that joins another's IPC namespace.
func useGuestShm(gs *specs.Spec, joinsIPC bool) {
	i := slices.IndexFunc(gs.Mounts, func(m specs.Mount) bool { return path.Clean(m.Destination) == "/dev/shm" })
	switch {
	case i < 0 && joinsIPC:
		gs.Mounts = append(gs.Mounts, guestShm)
	case i >= 0 && isBind(gs.Mounts[i]):
		gs.Mounts[i] = guestShm
	}
}

// podSizingSpec returns the spec the VM is sized by: a pod's sandbox
// carries the pod's resources (the sum of its containers', from the
// kubelet) as annotations, which then stand for the OCI resources; a
// standalone container is sized by its own resources.
func podSizingSpec(spec *specs.Spec) (*specs.Spec, error) {
	num := func(key string) (int64, error) {
		v, ok := spec.Annotations[key]
		if !ok || v == "" {
			return 0, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("annotation %s=%q: want a non-negative integer: %w", key, v, errdefs.ErrInvalidArgument)
		}
		return n, nil
	}
	period, err := num(annotationCPUPeriod)
	if err != nil {
		return nil, err
	}
	quota, err := num(annotationCPUQuota)
	if err != nil {
		return nil, err
	}
	mem, err := num(annotationMemory)
	if err != nil {
		return nil, err
	}
	if mem == 0 && (quota == 0 || period == 0) {
		return spec, nil
	}
	sized := *spec
	linux := specs.Linux{}
	if spec.Linux != nil {
		linux = *spec.Linux
	}
	res := &specs.LinuxResources{}
	if linux.Resources != nil {
		*res = *linux.Resources
	}
	if mem > 0 {
		res.Memory = &specs.LinuxMemory{Limit: &mem}
	}
	if quota > 0 && period > 0 {
		p := uint64(period)
		res.CPU = &specs.LinuxCPU{Quota: &quota, Period: &p}
	}
	linux.Resources = res
	sized.Linux = &linux
	return &sized, nil
}

// hostNamespaceFiles are the namespace types whose host-wide instance has a
// counterpart in the VM, with their /proc/PID/ns file names.
var hostNamespaceFiles = map[specs.LinuxNamespaceType]string{
	specs.PIDNamespace:    "pid",
	specs.IPCNamespace:    "ipc",
	specs.UTSNamespace:    "uts",
	specs.CgroupNamespace: "cgroup",
}

// hostInitNamespace tells whether path is the host's own namespace of type
// t: PID 1's (never a pod task: PID 1 in the VM is the agent), named by
// path because its namespace files may be unreadable even to root (a shim in
// a container without ptrace access to PID 1), or the one the shim itself
// is in. A variable so tests can fake it.
var hostInitNamespace = func(p string, t specs.LinuxNamespaceType) bool {
	file, ok := hostNamespaceFiles[t]
	if !ok {
		return false
	}
	if path.Clean(p) == "/proc/1/ns/"+file {
		return true
	}
	a, err := os.Stat(p)
	if err != nil {
		return false
	}
	b, err := os.Stat("/proc/self/ns/" + file)
	if err != nil {
		return false
	}
	return os.SameFile(a, b)
}
