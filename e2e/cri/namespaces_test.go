package cri_test

import (
	"regexp"
	"strings"
	"testing"
	"time"

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
//   - PID: with shared PIDs a container sees its sibling's process and PID 1 is the pod's (pause);
//     without, it sees only its own and is PID 1 itself.
//   - Pids and Kill stay scoped to the named container when PIDs are shared: the task's process list is
//     its own process only, and stopping one container leaves its sibling's process running.
func TestPodNamespaces(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt, harness.CRIConfig{})
		shared, sharedPath := runPod(t, d, rt, withNamespaces(podConfig(d, "shared-ns"), nsPod, nsPod))
		a := startContainer(t, d, shared, sharedPath, withNamespaces(containerConfig("a", "sleep", "31337"), nsPod, nsPod))
		b := startContainer(t, d, shared, sharedPath, withNamespaces(containerConfig("b", "sleep", "31338"), nsPod, nsPod))
		private, privatePath := runPod(t, d, rt, withNamespaces(podConfig(d, "private-ns"), nsContainer, nsPod))
		c := startContainer(t, d, private, privatePath, withNamespaces(containerConfig("c", "sleep", "31339"), nsContainer, nsPod))
		e := startContainer(t, d, private, privatePath, withNamespaces(containerConfig("e", "sleep", "31340"), nsContainer, nsPod))
		for _, id := range []string{a, b, c, e} {
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

		// PID: shared in the first pod, private in the second.
		if got := pgrep(t, d, b, "sleep 31337"); len(got) != 1 {
			t.Errorf("b (shared PIDs) finds a's process %v times, want once", got)
		}
		if got := crictl(t, d, "exec", b, "cat", "/proc/1/cmdline"); strings.Contains(got, "31338") || strings.Contains(got, "31337") {
			t.Errorf("PID 1 in the shared-PID pod is %q, want the pod's (pause), not a container's", got)
		}
		if got := pgrep(t, d, e, "sleep 3133[79]"); len(got) != 0 {
			t.Errorf("e (own PID namespace) sees other containers' processes: %v", got)
		}
		if got := crictl(t, d, "exec", e, "cat", "/proc/1/cmdline"); !strings.Contains(got, "31340") {
			t.Errorf("PID 1 in e (own PID namespace) is %q, want its own sleep 31340", got)
		}

		// Pids and Kill of one container of the shared-PID pod: its process only.
		for _, ct := range []string{a, b} {
			if n := taskProcs(t, d, ct); n != 1 {
				t.Errorf("ctr task ps %s: %d processes, want 1 (its sleep; the pod's others are not its)", ct, n)
			}
		}
		crictl(t, d, "stop", a)
		waitState(t, d, a, "CONTAINER_EXITED")
		if got := pgrep(t, d, b, "sleep 31338"); len(got) != 1 {
			t.Errorf("b's own process after stopping a: found %d times, want once", len(got))
		}
		if got := pgrep(t, d, b, "sleep 31337"); len(got) != 0 {
			t.Errorf("a's process still runs after crictl stop a: %v", got)
		}
		if st := inspect(t, d, b); st.Status.State != "CONTAINER_RUNNING" {
			t.Errorf("b after stopping a: %s, want CONTAINER_RUNNING", st.Status.State)
		}
	})
}

// pgrep runs `pgrep -f PATTERN` in container id and returns the PIDs it prints (none: exit status 1).
func pgrep(t *testing.T, d *harness.Containerd, id, pattern string) []string {
	t.Helper()
	res, err := d.Crictl(ctx(t, 2*time.Minute), "exec", id, "pgrep", "-f", pattern)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 && res.ExitCode != 1 {
		t.Fatalf("crictl exec %s pgrep -f %q: %v", id, pattern, res)
	}
	return strings.Fields(string(res.Stdout))
}

// taskProcs is the number of processes containerd's Pids call returns for a CRI container (`ctr task ps`).
func taskProcs(t *testing.T, d *harness.Containerd, id string) int {
	t.Helper()
	res, err := d.Ctr(ctx(t, 2*time.Minute), nil, "--namespace", harness.CRINamespace, "task", "ps", id)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("ctr task ps %s: %v", id, res)
	}
	lines := strings.Split(strings.TrimSpace(string(res.Stdout)), "\n")
	return len(lines) - 1 // the header
}
