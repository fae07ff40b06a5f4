package cri_test

import (
	"encoding/json"
	"strconv"
	"testing"

	"github.com/macvm/macvm/e2e/harness"
)

// TestPodLifecycle is issue 7's main acceptance scenario: one pod, two containers started in it (a
// web server and a client). On macvm the whole pod is one VM served by one shim. The containers reach
// each other over localhost, share the pod's IPC namespace and /dev/shm, and crictl exec, logs, stats, stop, rm, stopp and rmp work; removing one
// container leaves its sibling and the pod running.
func TestPodLifecycle(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt, harness.CRIConfig{})
		podID, podPath := runPod(t, d, rt, podConfig(d, "lifecycle"))
		if rt.VM {
			wantVMs(t, d, 1, "after runp")
		}

		server := startContainer(t, d, podID, podPath, containerConfig("server", "sh", "-c",
			`echo server-started; mkdir -p /www && echo hello-from-server > /www/index.html && `+
				`echo shm-from-server > /dev/shm/marker && exec httpd -f -p 127.0.0.1:8080 -h /www`))
		client := startContainer(t, d, podID, podPath, containerConfig("client", "sh", "-c",
			`echo client-started; trap 'exit 0' TERM; while :; do sleep 1; done`))
		for _, id := range []string{server, client} {
			waitState(t, d, id, "CONTAINER_RUNNING")
		}
		sameShim(t, d, podID, server, client)
		if rt.VM {
			wantVMs(t, d, 1, "two containers in the pod")
		}

		// localhost is the pod's: the client reaches the server's loopback-only listener.
		execUntil(t, d, client, "hello-from-server", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/")
		// Shared IPC: one IPC namespace and one /dev/shm for the pod's containers. (CRI has no private IPC
		// for one container of a pod: containerd joins every container to the sandbox's, on runc too.)
		execUntil(t, d, client, "shm-from-server", "cat", "/dev/shm/marker")
		serverIPC := crictl(t, d, "exec", server, "readlink", "/proc/self/ns/ipc")
		if got := crictl(t, d, "exec", client, "readlink", "/proc/self/ns/ipc"); got != serverIPC {
			t.Errorf("client's IPC namespace %s, server's %s: want the pod's shared one", got, serverIPC)
		}

		mustContain(t, "crictl logs server", crictl(t, d, "logs", server), "server-started")
		mustContain(t, "crictl logs client", crictl(t, d, "logs", client), "client-started")

		var stats struct {
			Stats []struct {
				Attributes struct {
					ID string `json:"id"`
				} `json:"attributes"`
				CPU struct {
					UsageCoreNanoSeconds struct {
						Value string `json:"value"`
					} `json:"usageCoreNanoSeconds"`
				} `json:"cpu"`
				Memory struct {
					WorkingSetBytes struct {
						Value string `json:"value"`
					} `json:"workingSetBytes"`
				} `json:"memory"`
			} `json:"stats"`
		}
		out := crictl(t, d, "stats", "-o", "json", "--id", server)
		if err := json.Unmarshal([]byte(out), &stats); err != nil {
			t.Fatalf("crictl stats: %v\n%s", err, out)
		}
		if len(stats.Stats) != 1 || stats.Stats[0].Attributes.ID != server {
			t.Fatalf("crictl stats --id %s: want one entry for it, got\n%s", server, out)
		}
		ws, _ := strconv.ParseUint(stats.Stats[0].Memory.WorkingSetBytes.Value, 10, 64)
		cpu, _ := strconv.ParseUint(stats.Stats[0].CPU.UsageCoreNanoSeconds.Value, 10, 64)
		if ws == 0 || cpu == 0 {
			t.Fatalf("crictl stats of the server: working set %d bytes, CPU %d ns; want both > 0\n%s", ws, cpu, out)
		}

		// Removing one container leaves the pod and its sibling running.
		crictl(t, d, "stop", client)
		waitState(t, d, client, "CONTAINER_EXITED")
		crictl(t, d, "rm", client)
		if got := podState(t, d, podID); got != "SANDBOX_READY" {
			t.Fatalf("pod after removing a container: %s, want SANDBOX_READY", got)
		}
		if st := inspect(t, d, server); st.Status.State != "CONTAINER_RUNNING" {
			t.Fatalf("server after removing its sibling: %s, want CONTAINER_RUNNING", st.Status.State)
		}
		execUntil(t, d, server, "hello-from-server", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/")
		if rt.VM {
			wantVMs(t, d, 1, "after removing one container")
		}

		crictl(t, d, "stopp", podID)
		if got := podState(t, d, podID); got != "SANDBOX_NOTREADY" {
			t.Fatalf("pod after stopp: %s, want SANDBOX_NOTREADY", got)
		}
		crictl(t, d, "rmp", podID)
		if out := crictl(t, d, "pods", "-q"); out != "" {
			t.Fatalf("pods after rmp: %q, want none", out)
		}
		if out := crictl(t, d, "ps", "-a", "-q"); out != "" {
			t.Fatalf("containers after rmp: %q, want none", out)
		}
		wantVMs(t, d, 0, "after rmp")
	})
}

// TestOOMKilled runs a container that allocates past its memory limit: crictl inspect must report it
// exited 137 with reason OOMKilled, and the pod and the sibling container stay as they were.
func TestOOMKilled(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt, harness.CRIConfig{})
		podID, podPath := runPod(t, d, rt, podConfig(d, "oom"))
		sibling := startContainer(t, d, podID, podPath, containerConfig("sibling", "sleep", "31342"))
		waitState(t, d, sibling, "CONTAINER_RUNNING")
		cfg := containerConfig("hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4")
		cfg["linux"] = map[string]any{"resources": map[string]any{"memory_limit_in_bytes": 32 << 20}}
		id := startContainer(t, d, podID, podPath, cfg)
		st := waitState(t, d, id, "CONTAINER_EXITED")
		if st.Status.ExitCode != 137 || st.Status.Reason != "OOMKilled" {
			t.Fatalf("container past its 32 MiB limit: exit %d reason %q, want 137 OOMKilled", st.Status.ExitCode, st.Status.Reason)
		}
		if got := podState(t, d, podID); got != "SANDBOX_READY" {
			t.Fatalf("pod after its container's OOM: %s, want SANDBOX_READY", got)
		}
		if st := inspect(t, d, sibling); st.Status.State != "CONTAINER_RUNNING" {
			t.Fatalf("sibling after the hog's OOM: %s, want CONTAINER_RUNNING", st.Status.State)
		}
		execUntil(t, d, sibling, "alive", "echo", "alive")
	})
}
