package service

import (
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestShimGroup(t *testing.T) {
	if g := shimGroup("c1", nil); g != "c1" {
		t.Errorf("standalone container: group %q, want its own ID", g)
	}
	pod := map[string]string{annotationSandboxID: "pod1", annotationContainerType: "container"}
	if g := shimGroup("c2", pod); g != "pod1" {
		t.Errorf("container of a pod: group %q, want the sandbox ID", g)
	}
	sandbox := map[string]string{annotationSandboxID: "pod1", annotationContainerType: "sandbox"}
	if g := shimGroup("pod1", sandbox); g != "pod1" {
		t.Errorf("the sandbox: group %q", g)
	}
}

// TestBundleAnnotations reads what the manager keys the shim socket on.
func TestBundleAnnotations(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"ociVersion":"1.2.0","annotations":{"io.kubernetes.cri.sandbox-id":"p"}}`), 0o644)
	a, err := bundleAnnotations(dir)
	if err != nil || a[annotationSandboxID] != "p" {
		t.Errorf("annotations %v, %v", a, err)
	}
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{`), 0o644)
	if _, err := bundleAnnotations(dir); !errdefs.IsInvalidArgument(err) {
		t.Errorf("bad spec: %v, want ErrInvalidArgument", err)
	}
}

// TestPodNamespaces: the network namespace never reaches the guest; a
// namespace path of a task of the pod names that task's namespace in the
// VM; joining IPC brings the guest /dev/shm; paths outside the pod are
// refused.
func TestPodNamespaces(t *testing.T) {
	owner := func(pid uint32) string {
		if pid == 57 {
			return "sandbox"
		}
		return ""
	}
	gs := &specs.Spec{
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/sandboxes/x/shm", Options: []string{"rbind", "ro"}},
		},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace},
			{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1234"},
			{Type: specs.IPCNamespace, Path: "/proc/57/ns/ipc"},
			{Type: specs.UTSNamespace, Path: "/proc/57/ns/uts"},
			{Type: specs.MountNamespace},
		}},
	}
	if err := podNamespaces(gs, owner); err != nil {
		t.Fatal(err)
	}
	want := []specs.LinuxNamespace{
		{Type: specs.PIDNamespace},
		{Type: specs.IPCNamespace, Path: "/proc/57/ns/ipc"},
		{Type: specs.UTSNamespace, Path: "/proc/57/ns/uts"},
		{Type: specs.MountNamespace},
	}
	if !reflect.DeepEqual(gs.Linux.Namespaces, want) {
		t.Errorf("namespaces:\n got %+v\nwant %+v", gs.Linux.Namespaces, want)
	}
	if !reflect.DeepEqual(gs.Mounts[1], guestShm) {
		t.Errorf("/dev/shm of a container joining the pod's IPC: %+v, want the guest tmpfs", gs.Mounts[1])
	}

	// The sandbox itself: its /dev/shm bind (CRI's host shm) becomes the
	// guest tmpfs too, which the agent then shares with the joiners.
	gs = &specs.Spec{Mounts: []specs.Mount{{Destination: "/dev/shm", Type: "bind", Source: "/run/x/shm", Options: []string{"rbind"}}},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.IPCNamespace}}}}
	if err := podNamespaces(gs, owner); err != nil || !reflect.DeepEqual(gs.Mounts[0], guestShm) {
		t.Errorf("sandbox /dev/shm: %+v, %v", gs.Mounts, err)
	}

	// A new network namespace goes too: the VM is the pod's network.
	gs = &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.NetworkNamespace}}}}
	if err := podNamespaces(gs, owner); err != nil || len(gs.Linux.Namespaces) != 0 {
		t.Errorf("new netns: %+v, %v", gs.Linux.Namespaces, err)
	}

	// The host's own namespaces (ctr --with-ns pid:/proc/1/ns/pid) map to
	// the VM's: the entry goes, the container shares the VM's namespace.
	defer func(f func(string, specs.LinuxNamespaceType) bool) { hostInitNamespace = f }(hostInitNamespace)
	hostInitNamespace = func(p string, t specs.LinuxNamespaceType) bool {
		return p == "/proc/1/ns/pid" && t == specs.PIDNamespace
	}
	gs = &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
		{Type: specs.PIDNamespace, Path: "/proc/1/ns/pid"}, {Type: specs.IPCNamespace}}}}
	if err := podNamespaces(gs, owner); err != nil || !reflect.DeepEqual(gs.Linux.Namespaces, []specs.LinuxNamespace{{Type: specs.IPCNamespace}}) {
		t.Errorf("host pid namespace: %+v, %v; want the VM's own (no entry)", gs.Linux.Namespaces, err)
	}

	for name, ns := range map[string]specs.LinuxNamespace{
		"a pid outside the pod": {Type: specs.IPCNamespace, Path: "/proc/424242/ns/ipc"},
		"a bind-mounted ns":     {Type: specs.UTSNamespace, Path: "/var/run/utsns/x"},
		"pid 0":                 {Type: specs.PIDNamespace, Path: "/proc/0/ns/pid"},
	} {
		gs := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{ns}}}
		if err := podNamespaces(gs, owner); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: %v, want ErrInvalidArgument", name, err)
		}
	}
}

// TestPodSizing: a sandbox's pod resources size the VM (CPU quota rounded
// up, memory + overhead), over its own (CRI gives the pause container no
// limits); config and macvm annotations still win.
func TestPodSizing(t *testing.T) {
	cfg := &Config{}
	pod := &specs.Spec{Annotations: map[string]string{
		annotationCPUPeriod: "100000", annotationCPUQuota: "150000", annotationMemory: strconvMiB(1024),
	}, Linux: &specs.Linux{Resources: &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: ptr(uint64(2))}}}}
	s, err := podSizingSpec(pod)
	if err != nil {
		t.Fatal(err)
	}
	cpus, mem, err := cfg.vmSize(s)
	if err != nil {
		t.Fatal(err)
	}
	wantCPUs := min(2, numCPU())
	if cpus != wantCPUs || mem != 1024+defaultMemoryOverheadMiB {
		t.Errorf("pod of 1.5 CPUs and 1 GiB: %d CPUs, %d MiB; want %d, %d", cpus, mem, wantCPUs, 1024+defaultMemoryOverheadMiB)
	}
	if pod.Linux.Resources.Memory != nil || pod.Linux.Resources.CPU.Quota != nil {
		t.Error("the container's spec was modified")
	}
	// No pod resources: the container's own spec.
	plain := &specs.Spec{}
	if s, err := podSizingSpec(plain); err != nil || s != plain {
		t.Errorf("without pod resources: %v, %v", s, err)
	}
	bad := &specs.Spec{Annotations: map[string]string{annotationMemory: "lots"}}
	if _, err := podSizingSpec(bad); !errdefs.IsInvalidArgument(err) {
		t.Errorf("bad annotation: %v, want ErrInvalidArgument", err)
	}
	pod.Annotations[AnnotationMemoryMiB] = "300"
	s, _ = podSizingSpec(pod)
	if _, mem, _ := cfg.vmSize(s); mem != 300 {
		t.Errorf("io.macvm.vm.memory_mib over the pod's resources: %d MiB, want 300", mem)
	}
}

func ptr[T any](v T) *T { return &v }

func strconvMiB(n int64) string { return strconv.FormatInt(n<<20, 10) }

func numCPU() int { return runtime.NumCPU() }
