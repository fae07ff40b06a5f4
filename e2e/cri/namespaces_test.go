package cri_test

import (
	"regexp"
	"strings"
	"testing"

	"github.com/macvm/macvm/e2e/harness"
)

// CRI's NamespaceMode values (k8s.io/cri-api): crictl reads the configs' enums as numbers.
const (
	nsPod       = 0
	nsContainer = 1
)

// shmSize is the size of the System V segment TestPodNamespaces creates: distinctive, so `ipcs -m`
// output is searched for this segment and no other (segment ids repeat across IPC namespaces).
const shmSize = "1234567"

// withNamespaces sets a pod's or container's linux.security_context.namespace_options.
func withNamespaces(cfg map[string]any, pid, ipc int) map[string]any {
	linux, _ := cfg["linux"].(map[string]any)
	if linux == nil {
		linux = map[string]any{}
		cfg["linux"] = linux
	}
	linux["security_context"] = map[string]any{"namespace_options": map[string]any{"pid": pid, "ipc": ipc}}
	return cfg
}

// shmLine returns the `ipcs -m` line of the segment id of shmSize bytes, or "".
func shmLine(ipcs, id string) string {
	for _, l := range strings.Split(ipcs, "\n") {
		f := strings.Fields(l)
		if len(f) >= 5 && f[1] == id && f[4] == shmSize {
			return l
		}
	}
	return ""
}

// TestPodNamespaces checks the namespaces a pod's containers share, as Kubernetes asks for them, in a
// pod with shared PIDs (shareProcessNamespace: namespace_options.pid = POD) and one without (pid =
// CONTAINER, the kubelet's default); both share the pod's IPC namespace, as CRI always does.
//   - IPC: a System V segment created in one container is visible from its sibling, and not from a
//     container of the other pod (its own IPC namespace).
func TestPodNamespaces(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt, harness.CRIConfig{})
		shared, sharedPath := runPod(t, d, rt, withNamespaces(podConfig(d, "shared-ns"), nsPod, nsPod))
		a := startContainer(t, d, shared, sharedPath, withNamespaces(containerConfig("a", "sleep", "31337"), nsPod, nsPod))
		b := startContainer(t, d, shared, sharedPath, withNamespaces(containerConfig("b", "sleep", "31338"), nsPod, nsPod))
		private, privatePath := runPod(t, d, rt, withNamespaces(podConfig(d, "private-ns"), nsContainer, nsPod))
		c := startContainer(t, d, private, privatePath, withNamespaces(containerConfig("c", "sleep", "31339"), nsContainer, nsPod))
		for _, id := range []string{a, b, c} {
			waitState(t, d, id, "CONTAINER_RUNNING")
		}
		if rt.VM {
			wantVMs(t, d, 2, "two pods")
		}

		// IPC: a's segment is b's (same pod), not c's (another pod, its own IPC namespace).
		out := crictl(t, d, "exec", a, "ipcmk", "-M", shmSize)
		m := regexp.MustCompile(`^Shared memory id: (\d+)$`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("ipcmk -M %s in a: %q, want \"Shared memory id: N\"", shmSize, out)
		}
		id := m[1]
		if ipcs := crictl(t, d, "exec", b, "ipcs", "-m"); shmLine(ipcs, id) == "" {
			t.Errorf("b (a's pod, shared IPC) does not see a's segment %s of %s bytes:\n%s", id, shmSize, ipcs)
		}
		if ipcs := crictl(t, d, "exec", c, "ipcs", "-m"); strings.Contains(ipcs, shmSize) {
			t.Errorf("c (another pod) sees a segment of %s bytes, want its own IPC namespace without a's:\n%s", shmSize, ipcs)
		}
		crictl(t, d, "exec", b, "ipcrm", "-m", id)
		if ipcs := crictl(t, d, "exec", a, "ipcs", "-m"); shmLine(ipcs, id) != "" {
			t.Errorf("a still sees segment %s after b removed it:\n%s", id, ipcs)
		}
	})
}
