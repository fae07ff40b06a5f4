package containerd_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	cgstats "github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/macvm/macvm/e2e/harness"
)

// podAnnotations are what CRI puts on a pod's containers: the shim groups them by sandbox ID.
func podAnnotations(sandboxID, kind string) oci.SpecOpts {
	return oci.WithAnnotations(map[string]string{
		"io.kubernetes.cri.sandbox-id":     sandboxID,
		"io.kubernetes.cri.container-type": kind,
	})
}

// startTask creates and starts container's task with no stdio; the test's cleanup kills and deletes it.
func startTask(t *testing.T, e *clientEnv, c containerd.Container) containerd.Task {
	t.Helper()
	task, err := c.NewTask(e.ctx, cio.NullIO)
	if err != nil {
		t.Fatalf("create task %s: %v", c.ID(), err)
	}
	t.Cleanup(func() { task.Delete(context.Background(), containerd.WithProcessKill) })
	if err := task.Start(e.ctx); err != nil {
		t.Fatalf("start task %s: %v", c.ID(), err)
	}
	return task
}

var execSeq int

// execIn runs args in task (container c's) and returns its stdout and exit status.
func execIn(t *testing.T, e *clientEnv, c containerd.Container, task containerd.Task, args ...string) (string, uint32) {
	t.Helper()
	spec, err := c.Spec(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	ps := spec.Process
	ps.Args = args
	execSeq++
	var stdout bytes.Buffer
	p, err := task.Exec(e.ctx, fmt.Sprintf("x%d", execSeq), ps, cio.NewCreator(cio.WithStreams(nil, &stdout, nil)))
	if err != nil {
		t.Fatalf("exec %v in %s: %v", args, c.ID(), err)
	}
	defer p.Delete(context.Background())
	statusC, err := p.Wait(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(e.ctx); err != nil {
		t.Fatalf("start exec %v in %s: %v", args, c.ID(), err)
	}
	st := <-statusC
	p.IO().Wait()
	return strings.TrimSpace(stdout.String()), st.ExitCode()
}

// execUntil repeats an exec until its output contains want (a server may still be starting).
func execUntil(t *testing.T, e *clientEnv, c containerd.Container, task containerd.Task, want string, args ...string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		out, code := execIn(t, e, c, task, args...)
		if strings.Contains(out, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v in %s: %q (exit %d), want %q", args, c.ID(), out, code, want)
		}
		time.Sleep(time.Second)
	}
}

// metricsOf reads a task's cgroup v2 metrics.
func metricsOf(t *testing.T, e *clientEnv, task containerd.Task) *cgstats.Metrics {
	t.Helper()
	mt, err := task.Metrics(e.ctx)
	if err != nil {
		t.Fatalf("metrics of %s: %v", task.ID(), err)
	}
	v, err := typeurl.UnmarshalAny(mt.Data)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := v.(*cgstats.Metrics)
	if !ok {
		t.Fatalf("metrics of %s: %T, want cgroup v2 Metrics", task.ID(), v)
	}
	return m
}

// vmsOf lists the hypervisor processes below the shim.
func vmsOf(t *testing.T, shimPid int) []harness.Proc {
	t.Helper()
	procs, err := harness.Descendants(shimPid)
	if err != nil {
		t.Fatal(err)
	}
	var vms []harness.Proc
	for _, p := range procs {
		if strings.Contains(p.Cmdline, "qemu-system") {
			vms = append(vms, p)
		}
	}
	return vms
}

// TestPod runs a pod the way CRI lays it out, through containerd's Go client: a sandbox container, then
// containers carrying the pod's annotations and naming the sandbox's IPC and UTS namespaces by
// /proc/<pid>/ns path. The whole pod is one shim and one VM; its containers reach each other over
// localhost, share IPC (/dev/shm) and the hostname; a container without the IPC path keeps a private
// /dev/shm; a container that exceeds its memory limit is OOM-killed (its TaskOOM published) while its
// siblings run on; deleting a container leaves the others and the VM running.
func TestPod(t *testing.T) {
	forEachRuntime(t, true, func(t *testing.T, rt harness.Runtime) {
		e := newClientEnv(t, rt)
		oomEvents, oomErrs := e.client.Subscribe(e.ctx, `topic=="/tasks/oom"`)

		sandbox := e.newContainer(t, "pod", podAnnotations("pod", "sandbox"), oci.WithHostname("podhost"),
			oci.WithProcessArgs("sh", "-c", "echo from-sandbox > /dev/shm/marker && exec sleep inf"))
		sbTask := startTask(t, e, sandbox)
		pid := sbTask.Pid()
		joined := func(kind string) []oci.SpecOpts {
			return []oci.SpecOpts{podAnnotations("pod", kind),
				oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.IPCNamespace, Path: fmt.Sprintf("/proc/%d/ns/ipc", pid)}),
				oci.WithLinuxNamespace(specs.LinuxNamespace{Type: specs.UTSNamespace, Path: fmt.Sprintf("/proc/%d/ns/uts", pid)}),
			}
		}
		server := e.newContainer(t, "pod-server", append(joined("container"),
			oci.WithProcessArgs("sh", "-c", "while :; do echo pong | nc -l -p 8080; done"))...)
		serverTask := startTask(t, e, server)
		client := e.newContainer(t, "pod-client", append(joined("container"), longCommand)...)
		clientTask := startTask(t, e, client)
		loner := e.newContainer(t, "pod-loner", podAnnotations("pod", "container"), longCommand)
		lonerTask := startTask(t, e, loner)

		shim, err := e.d.ShimPid("pod")
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"pod-server", "pod-client", "pod-loner"} {
			if p, err := e.d.ShimPid(id); err != nil || p != shim {
				t.Fatalf("%s is served by shim %d (%v), the pod's sandbox by %d: want one shim per pod", id, p, err, shim)
			}
		}
		vms := vmsOf(t, shim)
		if len(vms) != 1 {
			t.Fatalf("the pod's shim runs %d VMs, want 1: %v", len(vms), vms)
		}

		// The pod's network is the VM's: localhost reaches the server from the client.
		execUntil(t, e, client, clientTask, "pong", "nc", "127.0.0.1", "8080")
		// Shared IPC: the sandbox's /dev/shm and IPC namespace; shared UTS: its hostname.
		if out, _ := execIn(t, e, client, clientTask, "cat", "/dev/shm/marker"); out != "from-sandbox" {
			t.Errorf("client's /dev/shm/marker: %q, want the sandbox's", out)
		}
		sbIPC, _ := execIn(t, e, sandbox, sbTask, "readlink", "/proc/self/ns/ipc")
		if out, _ := execIn(t, e, client, clientTask, "readlink", "/proc/self/ns/ipc"); out != sbIPC || out == "" {
			t.Errorf("client's IPC namespace %q, sandbox's %q: want the same", out, sbIPC)
		}
		sbHost, _ := execIn(t, e, sandbox, sbTask, "hostname")
		sbUTS, _ := execIn(t, e, sandbox, sbTask, "readlink", "/proc/self/ns/uts")
		srvUTS, _ := execIn(t, e, server, serverTask, "readlink", "/proc/self/ns/uts")
		if out, _ := execIn(t, e, server, serverTask, "hostname"); out != "podhost" || srvUTS != sbUTS {
			t.Errorf("server's hostname %q (UTS %s), want the sandbox's podhost (sandbox: %q, UTS %s)", out, srvUTS, sbHost, sbUTS)
		}
		// Without the path, IPC (and /dev/shm) stay private.
		if out, code := execIn(t, e, loner, lonerTask, "cat", "/dev/shm/marker"); code == 0 {
			t.Errorf("a container with its own IPC namespace sees the pod's /dev/shm: %q", out)
		}
		if out, _ := execIn(t, e, loner, lonerTask, "readlink", "/proc/self/ns/ipc"); out == sbIPC {
			t.Errorf("a container with its own IPC namespace shares the sandbox's (%s)", out)
		}

		// OOM of one container: reported for it, siblings unharmed.
		hog := e.newContainer(t, "pod-hog", podAnnotations("pod", "container"), oci.WithMemoryLimit(32<<20),
			oci.WithProcessArgs("dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"))
		hogTask, err := hog.NewTask(e.ctx, cio.NullIO)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { hogTask.Delete(context.Background(), containerd.WithProcessKill) })
		hogExit, err := hogTask.Wait(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := hogTask.Start(e.ctx); err != nil {
			t.Fatal(err)
		}
		if code := (<-hogExit).ExitCode(); code != 137 {
			t.Fatalf("the memory hog exited %d, want 137 (OOM-killed)", code)
		}
		sawOOM := false
		for deadline := time.After(time.Minute); !sawOOM; {
			select {
			case env := <-oomEvents:
				v, err := typeurl.UnmarshalAny(env.Event)
				if oom, ok := v.(*eventstypes.TaskOOM); err == nil && ok {
					if oom.ContainerID != "pod-hog" {
						t.Errorf("OOM event for %s, only pod-hog ran out of memory", oom.ContainerID)
					}
					sawOOM = oom.ContainerID == "pod-hog"
				}
			case err := <-oomErrs:
				t.Fatalf("event subscription: %v", err)
			case <-deadline:
				t.Fatal("no TaskOOM event for pod-hog")
			}
		}
		// Stats keep answering after the exit, with the OOM kill counted (what CRI reports as OOMKilled).
		if m := metricsOf(t, e, hogTask); m.GetMemoryEvents().GetOomKill() == 0 {
			t.Errorf("stats of the OOM-killed container: no OOM kill in %v", m.GetMemoryEvents())
		}
		// Per-container stats of a live sibling: its own working set and CPU.
		if m := metricsOf(t, e, serverTask); m.GetMemory().GetUsage() == 0 || m.GetCPU().GetUsageUsec() == 0 {
			t.Errorf("stats of the server: memory %v, CPU %v; want usage > 0", m.GetMemory(), m.GetCPU())
		}
		if _, err := hogTask.Delete(e.ctx); err != nil {
			t.Fatal(err)
		}
		for _, tk := range []containerd.Task{sbTask, serverTask, clientTask, lonerTask} {
			if st, err := tk.Status(e.ctx); err != nil || st.Status != containerd.Running {
				t.Errorf("%s after a sibling's OOM: %v, %v; want running", tk.ID(), st.Status, err)
			}
		}

		// Deleting one container leaves the others, and the VM, running.
		if err := clientTask.Kill(e.ctx, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		clientExit, err := clientTask.Wait(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		<-clientExit
		if _, err := clientTask.Delete(e.ctx); err != nil {
			t.Fatal(err)
		}
		execUntil(t, e, sandbox, sbTask, "pong", "nc", "127.0.0.1", "8080")
		if st, err := serverTask.Status(e.ctx); err != nil || st.Status != containerd.Running {
			t.Errorf("server after deleting the client: %v, %v; want running", st.Status, err)
		}
		if after := vmsOf(t, shim); len(after) != 1 || after[0].Pid != vms[0].Pid {
			t.Errorf("VMs after deleting one container: %v, want the pod's one VM %v still there", after, vms)
		}
	})
}
