package service

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// TestPodLifecycle runs two containers in one shim: they share one VM;
// an OOM event reaches the container it names; the exit and the delete of
// one leave the other and the VM running; the last delete stops the VM
// and undoes every host mount.
func TestPodLifecycle(t *testing.T) {
	h := newHarness(t, nil)
	h.create("pause", nil)
	h.start("pause", "")
	// The app joins the sandbox's IPC namespace by the pid the shim
	// reported; a path naming no task of the pod is refused.
	st, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "pause"})
	if err != nil {
		t.Fatal(err)
	}
	ipc := fmt.Sprintf("/proc/%d/ns/ipc", st.Pid)
	withIPC := func(path string) func(*specs.Spec) {
		return func(s *specs.Spec) {
			s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: path}, {Type: specs.NetworkNamespace, Path: "/var/run/netns/x"}}
		}
	}
	if _, err := h.svc.Create(h.ctx, &taskAPI.CreateTaskRequest{ID: "stray", Bundle: h.bundle("stray", withIPC("/proc/424242/ns/ipc")), Options: h.opts}); !errdefs.IsInvalidArgument(errgrpc.ToNative(err)) {
		t.Errorf("joining a namespace outside the pod: %v, want ErrInvalidArgument", err)
	}
	h.create("app", &taskAPI.CreateTaskRequest{Bundle: h.bundle("app", withIPC(ipc))})
	h.start("app", "")
	var gs specs.Spec
	h.agent.mu.Lock()
	err = json.Unmarshal(h.agent.specs["app"], &gs)
	h.agent.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if want := []specs.LinuxNamespace{{Type: specs.IPCNamespace, Path: ipc}}; !reflect.DeepEqual(gs.Linux.Namespaces, want) {
		t.Errorf("the app's guest namespaces: %+v, want %+v", gs.Linux.Namespaces, want)
	}
	h.mu.Lock()
	n := len(h.machines)
	h.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d VMs for a pod of two containers, want 1", n)
	}
	shared := filepath.Join(vmStateDir(h.svc.stateBase, "test", "pause", filepath.Join(h.dir, "pause")), "shared")
	for _, id := range []string{"pause", "app"} {
		if got := h.mnt.get(filepath.Join(shared, id, "rootfs")); got != "bind "+filepath.Join(h.dir, id, "rootfs") {
			t.Errorf("%s's rootfs in the pod share: %q", id, got)
		}
	}

	h.agent.events <- &agent.Event{Event: &agent.Event_Oom{Oom: &agent.OOMEvent{ContainerId: "app"}}}
	h.events(5)
	if _, err := h.svc.Kill(h.ctx, &taskAPI.KillRequest{ID: "app", Signal: 9}); err != nil {
		t.Fatal(err)
	}
	if got := h.wait("app", ""); got != 137 {
		t.Errorf("app exit %d, want 137", got)
	}
	if _, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "app"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.machine(0).Done():
		t.Fatal("deleting one container of the pod stopped the VM")
	default:
	}
	if h.agent.called("Shutdown") {
		t.Error("the guest was shut down with a container left")
	}
	if _, err := os.Stat(filepath.Join(shared, "app")); !os.IsNotExist(err) || h.mnt.get(filepath.Join(shared, "app", "rootfs")) != "" {
		t.Errorf("app's host mounts left after its delete: %v", err)
	}
	st, err = h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "pause"})
	if err != nil || st.Status != task.Status_RUNNING {
		t.Fatalf("the sibling after the delete: %v, %v", st, err)
	}
	if _, err := h.svc.Shutdown(h.ctx, &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
		t.Fatal("Shutdown ended the shim while the pod still had a container")
	default:
	}

	if _, err := h.svc.Kill(h.ctx, &taskAPI.KillRequest{ID: "pause", Signal: 15}); err != nil {
		t.Fatal(err)
	}
	h.wait("pause", "")
	if _, err := h.svc.Delete(h.ctx, &taskAPI.DeleteRequest{ID: "pause"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.machine(0).Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the last delete left the VM running")
	}
	h.svc.waitTeardowns(h.ctx) // the host cleanup follows the VM's exit
	if h.mnt.count() != 0 {
		t.Errorf("%d host mounts left after the last delete", h.mnt.count())
	}
	if _, err := os.Stat(filepath.Dir(shared)); !os.IsNotExist(err) {
		t.Errorf("VM state dir left: %v", err)
	}
	wantEvents(t, h.events(9), "create pause", "start pause", "create app", "start app", "oom app",
		"exit app 137", "delete app", "exit pause 143", "delete pause")

	// A new create after the pod's VM went boots a fresh one.
	h.create("again", nil)
	h.mu.Lock()
	n = len(h.machines)
	h.mu.Unlock()
	if n != 2 {
		t.Errorf("%d VMs after a create in an emptied shim, want 2", n)
	}
	if _, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "app"}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
		t.Errorf("state of a deleted container: %v", err)
	}
}
