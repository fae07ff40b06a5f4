package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/bootimage"
)

// These tests boot the real Debian kernel under QEMU with a tiny test
// init (testdata/testinit). They need the kernel from `make kernel`:
// MACVM_KERNEL, default _output/kernel/debian/vmlinux, with its modules in
// the modules/ directory beside it.

var (
	initrdOnce sync.Once
	initrdPath string
	initrdErr  error
)

func testKernel(t *testing.T) string {
	t.Helper()
	k := os.Getenv("MACVM_KERNEL")
	if k == "" {
		k = filepath.Join("..", "..", "_output", "kernel", "debian", "vmlinux")
	}
	abs, err := filepath.Abs(k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		t.Fatalf("boot tests need a kernel at %s (run `make kernel` or set MACVM_KERNEL): %v", abs, err)
	}
	return abs
}

// testInitrd builds testinit and an initramfs with it and the kernel's
// modules, once per test binary.
func testInitrd(t *testing.T, kernel string) string {
	t.Helper()
	initrdOnce.Do(func() {
		dir, err := os.MkdirTemp("", "macvm-vm-test-")
		if err != nil {
			initrdErr = err
			return
		}
		bin := filepath.Join(dir, "testinit")
		cmd := exec.Command("go", "build", "-o", bin, "./testdata/testinit")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
		if out, err := cmd.CombinedOutput(); err != nil {
			initrdErr = fmt.Errorf("building testinit: %v\n%s", err, out)
			return
		}
		var mods []*bootimage.Module
		if modDir := filepath.Join(filepath.Dir(kernel), "modules"); dirExists(modDir) {
			if mods, err = bootimage.ReadModuleDir(modDir); err != nil {
				initrdErr = err
				return
			}
		}
		initrdPath = filepath.Join(dir, "initrd.img")
		f, err := os.Create(initrdPath)
		if err != nil {
			initrdErr = err
			return
		}
		defer f.Close()
		initrdErr = bootimage.WriteInitrd(f, bootimage.InitrdSpec{Init: bin, Modules: mods})
	})
	if initrdErr != nil {
		t.Fatal(initrdErr)
	}
	return initrdPath
}

func dirExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// newTestVM returns a started VM running testinit in the given mode; it is
// killed at the end of the test whatever happens.
func newTestVM(t *testing.T, mode string, mutate func(*Config)) *QEMU {
	t.Helper()
	kernel := testKernel(t)
	cfg := Config{
		ID:         t.Name(),
		StateDir:   t.TempDir(),
		Kernel:     kernel,
		Initrd:     testInitrd(t, kernel),
		KernelArgs: []string{"macvm.test=" + mode},
		CPUs:       1,
		MemoryMiB:  256,
	}
	if mutate != nil {
		mutate(&cfg)
	}
	m, err := NewQEMU(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // kill at once
		_ = m.Stop(ctx)
	})
	return m
}

// bootTimeout bounds a boot to the agent; generous because TCG on a
// loaded 2-core machine is slow.
const bootTimeout = 90 * time.Second

func readLine(t *testing.T, c net.Conn, r *bufio.Reader, timeout time.Duration) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading from the agent channel: %v (got %q)", err, line)
	}
	return strings.TrimSuffix(line, "\n")
}

func TestBootHelloOverAgentChannel(t *testing.T) {
	dir := t.TempDir()
	disk0, disk1 := filepath.Join(dir, "d0.img"), filepath.Join(dir, "d1.img")
	for p, size := range map[string]int64{disk0: 1 << 20, disk1: 3 << 20} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
	}
	rwDir, roDir := filepath.Join(dir, "rw"), filepath.Join(dir, "ro")
	for _, d := range []string{rwDir, roDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m := newTestVM(t, "hello", func(c *Config) {
		c.Disks = []Disk{{Path: disk0}, {Path: disk1, ReadOnly: true}}
		c.Shares = []Share{{Tag: "rw-share", HostPath: rwDir}, {Tag: "ro-share", HostPath: roDir, ReadOnly: true}}
	})

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	conn, err := m.AgentConn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	if got := readLine(t, conn, r, bootTimeout); got != "hello" {
		t.Fatalf("first line from the guest: got %q, want %q", got, "hello")
	}
	t.Logf("qemu exec -> hello from /init: %v (kvm=%v)", time.Since(m.BootStarted()).Round(time.Millisecond), m.kvm)

	// Disks appear as vda, vdb in Config order with their sizes (in
	// 512-byte sectors) and read-only flags; shares by tag, writable or
	// not as configured.
	want := "disks vda:2048:0,vdb:6144:1 tags ro-share,rw-share access ro-share=ro,rw-share=rw"
	if got := readLine(t, conn, r, 30*time.Second); got != want {
		t.Fatalf("guest view: got %q, want %q", got, want)
	}
	if b, err := os.ReadFile(filepath.Join(rwDir, "written-by-guest")); err != nil || string(b) != "rw-share" {
		t.Errorf("guest write to the rw share: %q, %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(roDir, "written-by-guest")); !os.IsNotExist(err) {
		t.Errorf("guest wrote to the read-only share: %v", err)
	}

	if _, err := conn.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if got := readLine(t, conn, r, 10*time.Second); got != "ping" {
		t.Fatalf("echo: got %q, want %q", got, "ping")
	}

	// A paused guest answers nothing; after Resume it answers.
	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("while-paused\n")); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	if line, err := r.ReadString('\n'); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("paused guest answered: %q, %v", line, err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if got := readLine(t, conn, r, 10*time.Second); got != "while-paused" {
		t.Fatalf("after resume: got %q, want %q", got, "while-paused")
	}

	// The guest powers off; Done closes and the exit is clean.
	if _, err := conn.Write([]byte("poweroff\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("VM still running 30s after poweroff; console:\n%s", m.ConsoleTail(2000))
	}
	if err := m.Err(); err != nil {
		t.Fatalf("clean power-off: Err() = %v, want nil", err)
	}
	// The channel reports the end instead of blocking.
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := r.ReadString('\n'); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read after exit: got %v, want EOF", err)
	}
	if err := m.Stop(context.Background()); err != nil {
		t.Fatalf("Stop after exit: %v", err)
	}
	conn.Close()
}

func TestSilentGuestFailsBoundedWaitAndStopKills(t *testing.T) {
	m := newTestVM(t, "silent", nil)
	// Wait until init runs (blind polling is fine in a test), so the
	// console tail is known to hold its line.
	deadline := time.Now().Add(bootTimeout)
	for !strings.Contains(m.ConsoleTail(4096), "testinit: mode silent") {
		if time.Now().After(deadline) {
			t.Fatalf("testinit never started; console:\n%s", m.ConsoleTail(2000))
		}
		time.Sleep(100 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	_, err := m.AgentConn(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("AgentConn on a silent guest: got %v, want a deadline error", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("AgentConn took %v with a 1s deadline", el)
	}
	if !strings.Contains(err.Error(), "testinit: mode silent") {
		t.Fatalf("error lacks the console tail: %v", err)
	}

	// Stop gives the guest until ctx ends, then kills it.
	pid := m.Pid()
	stopCtx, stopCancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer stopCancel()
	start = time.Now()
	if err := m.Stop(stopCtx); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 400*time.Millisecond || el > 10*time.Second {
		t.Fatalf("Stop returned after %v, want just after its 500ms deadline", el)
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if err := m.Err(); !errdefs.IsAborted(err) {
		t.Fatalf("Err after a kill: got %v, want ErrAborted", err)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("qemu pid %d still exists after Stop: %v", pid, err)
	}
	if err := m.Stop(context.Background()); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
}

func TestGuestPanicIsAnError(t *testing.T) {
	m := newTestVM(t, "exit", nil)
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	// The agent never opens its port: AgentConn must report the exit,
	// not wait for its deadline.
	_, err := m.AgentConn(ctx)
	if err == nil || ctx.Err() != nil {
		t.Fatalf("AgentConn on a panicking guest: got %v (ctx %v), want the exit", err, ctx.Err())
	}
	<-m.Done()
	err = m.Err()
	if !errdefs.IsUnavailable(err) {
		t.Fatalf("Err after a kernel panic: got %v, want ErrUnavailable", err)
	}
	if !strings.Contains(err.Error(), "Attempted to kill init") {
		t.Fatalf("Err lacks the panic from the console: %v", err)
	}
}

func TestStartFailureReportsQEMULog(t *testing.T) {
	kernel := testKernel(t)
	dir := t.TempDir()
	// A "hypervisor" that complains and exits, as qemu does on a bad flag.
	fake := filepath.Join(dir, "fake-qemu")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'fake-qemu: unsupported machine' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := NewQEMU(Config{ID: "bad", StateDir: dir, Kernel: kernel, Hypervisor: fake})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = m.Start(ctx)
	if err == nil {
		t.Fatal("Start with a failing hypervisor succeeded")
	}
	if !strings.Contains(err.Error(), "fake-qemu: unsupported machine") {
		t.Fatalf("Start error lacks qemu's stderr: %v", err)
	}
	select {
	case <-m.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed after a failed Start")
	}
	if err := m.Start(ctx); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("second Start: got %v, want ErrFailedPrecondition", err)
	}
}

func TestNewQEMURejectsMissingFiles(t *testing.T) {
	_, err := NewQEMU(Config{ID: "x", StateDir: t.TempDir(), Kernel: "/nonexistent/vmlinux"})
	if !errdefs.IsNotFound(err) {
		t.Fatalf("missing kernel: got %v, want ErrNotFound", err)
	}
	_, err = NewQEMU(Config{ID: "x", Kernel: "/nonexistent/vmlinux"})
	if !errdefs.IsInvalidArgument(err) {
		t.Fatalf("no state dir: got %v, want ErrInvalidArgument", err)
	}
}

// TestHelperProcess is not a test: TestQEMUDiesWithItsParent runs the test
// binary again with MACVM_VM_HELPER set, to be a parent it can kill.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("MACVM_VM_HELPER") != "1" {
		return
	}
	m, err := NewQEMU(Config{
		ID: "orphan", StateDir: os.Getenv("MACVM_VM_HELPER_STATE"),
		Kernel: os.Getenv("MACVM_KERNEL"), Initrd: os.Getenv("MACVM_VM_HELPER_INITRD"),
		KernelArgs: []string{"macvm.test=silent"},
	})
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = m.Start(ctx)
		cancel()
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println(m.Pid())
	time.Sleep(time.Hour)
}

// processGone reports whether pid has exited (a zombie counts as gone:
// its reaping is its new parent's business).
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state follows the command name in parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] == 'Z'
}

func TestQEMUDiesWithItsParent(t *testing.T) {
	kernel := testKernel(t)
	initrd := testInitrd(t, kernel)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), "MACVM_VM_HELPER=1", "MACVM_KERNEL="+kernel,
		"MACVM_VM_HELPER_INITRD="+initrd, "MACVM_VM_HELPER_STATE="+t.TempDir())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v (%q)", err, line)
	}
	var pid int
	if _, err := fmt.Sscanf(line, "%d", &pid); err != nil || pid <= 0 {
		t.Fatalf("helper said %q", line)
	}
	if processGone(pid) {
		t.Fatalf("qemu %d not running under the helper", pid)
	}
	// The shim dies without cleaning up: qemu must not outlive it.
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("qemu %d survived its parent's death", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
