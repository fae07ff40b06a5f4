package service

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
)

// TestStopCleansUpAfterDeadShim plays containerd's delete action on the
// bundle of a shim that died: the VM it left (a stand-in process naming the
// VM state dir) is killed, the state dir removed, and the recorded exit
// returned; without a record the exit is 137.
func TestStopCleansUpAfterDeadShim(t *testing.T) {
	bundle := t.TempDir()
	stateDir := filepath.Join(t.TempDir(), "vm")
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// The stand-in must keep its command line (naming stateDir) until it is
	// killed: a shell blocked in its read builtin never execs anything, while
	// `sh -c "sleep 60"` may exec sleep and lose the argument.
	stdin, keepOpen, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer keepOpen.Close()
	vmProc := exec.Command("/bin/sh", "-c", "read line", stateDir)
	vmProc.Stdin = stdin
	if err := vmProc.Start(); err != nil {
		t.Fatal(err)
	}
	stdin.Close()
	// Start returns once execve has passed its point of no return, a moment
	// before the kernel fills in the new command line: wait for it, as the
	// delete action only ever meets VMs that have long been running.
	for deadline := time.Now().Add(5 * time.Second); ; {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", vmProc.Process.Pid))
		if len(b) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stand-in VM process has no command line")
		}
		time.Sleep(time.Millisecond)
	}
	exited := make(chan struct{})
	go func() { vmProc.Wait(); close(exited) }()
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := writeBundleState(bundle, &bundleState{
		VMPid: vmProc.Process.Pid, VMStateDir: stateDir,
		Exit: &bundleExit{Pid: 7, Status: 42, ExitedAt: at},
	}); err != nil {
		t.Fatal(err)
	}
	ctx := namespaces.WithNamespace(context.Background(), "test")
	ctx = context.WithValue(ctx, shim.OptsKey{}, shim.Opts{BundlePath: bundle})
	st, err := NewManager("io.containerd.macvm.v1").Stop(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitStatus != 42 || st.Pid != 7 || !st.ExitedAt.Equal(at) {
		t.Errorf("stop status %+v, want the recorded exit", st)
	}
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		vmProc.Process.Kill()
		t.Error("the leftover VM process was not killed")
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Errorf("VM state dir still there: %v", err)
	}

	// No record: the task is reported killed, and an unrelated process
	// whose pid is recorded is left alone.
	other := exec.Command("/bin/sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { other.Process.Kill(); other.Wait() }()
	bundle2 := t.TempDir()
	writeBundleState(bundle2, &bundleState{VMPid: other.Process.Pid, VMStateDir: "/run/macvm/not-this-one"})
	ctx = context.WithValue(ctx, shim.OptsKey{}, shim.Opts{BundlePath: bundle2})
	st, err = NewManager("io.containerd.macvm.v1").Stop(ctx, "c")
	if err != nil || st.ExitStatus != 137 {
		t.Errorf("stop without a record: %+v, %v", st, err)
	}
	time.Sleep(100 * time.Millisecond)
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("a process that is not the VM was killed: %v", err)
	}
}

// TestStopLeavesLiveShimsVM plays the delete action containerd runs when
// its connection for one container of a pod closes (after a normal
// delete) while the pod's shim still serves the others: the VM the record
// names is left running.
func TestStopLeavesLiveShimsVM(t *testing.T) {
	bundle := t.TempDir()
	vmProc := exec.Command("/bin/sleep", "60")
	if err := vmProc.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { vmProc.Process.Kill(); vmProc.Wait() }()
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	os.WriteFile(filepath.Join(bundle, addressFile), []byte("unix://"+sock), 0o600)
	// The record names the VM by a command line that is not this sleep's,
	// so only the liveness check can be what keeps it: make the record
	// match by naming the argument sleep got.
	writeBundleState(bundle, &bundleState{VMPid: vmProc.Process.Pid, VMStateDir: "60"})
	ctx := namespaces.WithNamespace(context.Background(), "test")
	ctx = context.WithValue(ctx, shim.OptsKey{}, shim.Opts{BundlePath: bundle})
	if _, err := NewManager("io.containerd.macvm.v1").Stop(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if err := vmProc.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("the VM of a live shim was killed: %v", err)
	}
	if _, err := os.Stat(sock); err != nil {
		t.Errorf("the live shim's socket was removed: %v", err)
	}
}

// TestStopKillsPooledVM: a VM from the warm-start pool runs in the pool's
// directory (its command line names that, not the VM state directory) and
// is not the shim's child; the delete action after the shim died kills it
// by the recorded pool directory, and leaves it alone when the pid now
// names another directory.
func TestStopKillsPooledVM(t *testing.T) {
	poolVM := filepath.Join(t.TempDir(), "pool", "vm-0123456789ab")
	standIn := func(arg string) (*exec.Cmd, chan struct{}) {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("/bin/sh", "-c", "read line", arg)
		cmd.Stdin = r
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		r.Close()
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		t.Cleanup(func() { cmd.Process.Kill(); w.Close(); <-exited })
		for deadline := time.Now().Add(5 * time.Second); ; {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cmd.Process.Pid)); len(b) > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the stand-in VM process has no command line")
			}
			time.Sleep(time.Millisecond)
		}
		return cmd, exited
	}
	stop := func(st *bundleState) {
		t.Helper()
		bundle := t.TempDir()
		if err := writeBundleState(bundle, st); err != nil {
			t.Fatal(err)
		}
		ctx := namespaces.WithNamespace(context.Background(), "test")
		ctx = context.WithValue(ctx, shim.OptsKey{}, shim.Opts{BundlePath: bundle})
		if _, err := NewManager("io.containerd.macvm.v1").Stop(ctx, "c"); err != nil {
			t.Fatal(err)
		}
	}

	other, otherExited := standIn(filepath.Join(t.TempDir(), "pool", "vm-ba9876543210") + "/console.log")
	stop(&bundleState{VMPid: other.Process.Pid, VMStateDir: filepath.Join(t.TempDir(), "state"), VMPoolDir: poolVM})
	select {
	case <-otherExited:
		t.Fatal("a qemu of another pooled VM was killed")
	case <-time.After(100 * time.Millisecond):
	}

	vmProc, exited := standIn(poolVM + "/console.log")
	stop(&bundleState{VMPid: vmProc.Process.Pid, VMStateDir: filepath.Join(t.TempDir(), "state"), VMPoolDir: poolVM})
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the pooled VM of a dead shim was not killed")
	}
}
