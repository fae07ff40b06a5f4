package cri_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// Helpers that run crictl and build the pod and container configs it reads (JSON, with the CRI
// message field names).

// crictl runs crictl and fails the test unless it exits 0; it returns stdout without surrounding space.
func crictl(t *testing.T, d *harness.Containerd, args ...string) string {
	t.Helper()
	res, err := d.Crictl(ctx(t, 5*time.Minute), args...)
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("crictl %s: %v", strings.Join(args, " "), res)
	}
	return strings.TrimSpace(string(res.Stdout))
}

// podConfig is a PodSandboxConfig for a pod named name; its log directory lives in the daemon's dir and
// its host cgroups under the daemon's namespace (which the harness removes at cleanup).
func podConfig(d *harness.Containerd, name string) map[string]any {
	return map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "e2e", "uid": "uid-" + name, "attempt": 0},
		"log_directory": filepath.Join(d.Dir, "pods", name),
		"linux": map[string]any{
			"cgroup_parent": "/" + d.Namespace,
		},
	}
}

// containerConfig is a ContainerConfig for a busybox container named name running cmd.
func containerConfig(name string, cmd ...string) map[string]any {
	return map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": harness.BusyboxImage},
		"command":  cmd,
		"log_path": name + ".log",
		"linux":    map[string]any{},
	}
}

// writeJSON writes v to a new file in the daemon's dir and returns its path.
func writeJSON(t *testing.T, d *harness.Containerd, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.CreateTemp(d.Dir, "cfg-*.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// runPod is `crictl runp --runtime HANDLER`; it returns the pod sandbox id and the config's path.
func runPod(t *testing.T, d *harness.Containerd, rt harness.Runtime, cfg map[string]any) (string, string) {
	t.Helper()
	path := writeJSON(t, d, cfg)
	start := time.Now()
	id := crictl(t, d, "runp", "--runtime", handler(rt), path)
	t.Logf("pod %s on %s ready in %v", id, handler(rt), time.Since(start).Round(time.Millisecond))
	return id, path
}

// startContainer creates and starts a container in a pod and returns its id.
func startContainer(t *testing.T, d *harness.Containerd, podID, podPath string, cfg map[string]any) string {
	t.Helper()
	id := crictl(t, d, "create", podID, writeJSON(t, d, cfg), podPath)
	crictl(t, d, "start", id)
	return id
}

// containerStatus is what the tests read from `crictl inspect -o json`.
type containerStatus struct {
	Status struct {
		State    string `json:"state"`
		ExitCode int    `json:"exitCode"`
		Reason   string `json:"reason"`
	} `json:"status"`
}

func inspect(t *testing.T, d *harness.Containerd, id string) containerStatus {
	t.Helper()
	out := crictl(t, d, "inspect", "-o", "json", id)
	var st containerStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("crictl inspect %s: %v\n%s", id, err, out)
	}
	return st
}

// podState is the pod's state from `crictl inspectp`.
func podState(t *testing.T, d *harness.Containerd, id string) string {
	t.Helper()
	out := crictl(t, d, "inspectp", "-o", "json", id)
	var st struct {
		Status struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("crictl inspectp %s: %v\n%s", id, err, out)
	}
	return st.Status.State
}

// waitState polls the container's state until it is want (generous bound: the machine is loaded).
func waitState(t *testing.T, d *harness.Containerd, id, want string) containerStatus {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		st := inspect(t, d, id)
		if st.Status.State == want {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s: state %s, want %s", id, st.Status.State, want)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// execUntil runs `crictl exec` until its stdout (trimmed) is want or the bound passes: a server in a
// sibling container may still be starting.
func execUntil(t *testing.T, d *harness.Containerd, id, want string, cmd ...string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	args := append([]string{"exec", id}, cmd...)
	for {
		res, err := d.Crictl(ctx(t, 2*time.Minute), args...)
		if err != nil {
			t.Fatal(err)
		}
		got := strings.TrimSpace(string(res.Stdout))
		if res.ExitCode == 0 && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("crictl exec %s %v: %v\nwant stdout %q", id, cmd, res, want)
		}
		time.Sleep(time.Second)
	}
}

// vms lists the hypervisor processes started for this daemon: QEMU processes among the test's
// descendants that descend from a shim of this daemon (one whose command line names its socket).
func vms(t *testing.T, d *harness.Containerd) []harness.Proc {
	t.Helper()
	procs, err := harness.Descendants(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	byPid := map[int]harness.Proc{}
	for _, p := range procs {
		byPid[p.Pid] = p
	}
	ours := func(p harness.Proc) bool {
		for cur, ok := byPid[p.PPid]; ok; cur, ok = byPid[cur.PPid] {
			if strings.Contains(cur.Cmdline, "-address "+d.Address+" ") || strings.HasSuffix(cur.Cmdline, "-address "+d.Address) {
				return true
			}
		}
		return false
	}
	var out []harness.Proc
	for _, p := range procs {
		if strings.HasPrefix(filepath.Base(strings.Fields(p.Cmdline + " x")[0]), "qemu-system") && ours(p) {
			out = append(out, p)
		}
	}
	return out
}

// wantVMs fails unless exactly n VMs run for the daemon (waiting up to a minute for a count that is
// still settling down, e.g. a VM that is being shut down).
func wantVMs(t *testing.T, d *harness.Containerd, n int, what string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		got := vms(t, d)
		if len(got) == n {
			return
		}
		if time.Now().After(deadline) {
			all, _ := harness.Descendants(os.Getpid())
			t.Fatalf("%s: %d VMs run, want %d: %v\nall processes of the test: %v", what, len(got), n, got, all)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// sameShim fails unless every id is served by the shim that serves the pod sandbox.
func sameShim(t *testing.T, d *harness.Containerd, podID string, ids ...string) {
	t.Helper()
	want, err := d.CRIShimPid(podID)
	if err != nil {
		t.Fatalf("shim of pod %s: %v", podID, err)
	}
	for _, id := range ids {
		got, err := d.CRIShimPid(id)
		if err != nil {
			t.Fatalf("shim of container %s: %v", id, err)
		}
		if got != want {
			t.Errorf("container %s is served by shim %d, the pod by shim %d: want one shim per pod", id, got, want)
		}
	}
}

func mustContain(t *testing.T, what, got, want string) {
	t.Helper()
	if !strings.Contains(got, want) {
		t.Fatalf("%s: %q does not contain %q", what, got, want)
	}
}
