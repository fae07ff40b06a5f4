package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/macvm/macvm/pkg/bootimage"
	"github.com/macvm/macvm/pkg/guest"
	"github.com/macvm/macvm/pkg/vm"
)

// These tests run `macvm-kernel deb` on Debian's real kernel packages,
// fetched by hack/fetch-kernel-debs.sh (`make test-macos-kernel` does both)
// into MACVM_DEB_DIR.

func realDeb(t *testing.T, glob string, exclude string) string {
	t.Helper()
	dir := os.Getenv("MACVM_DEB_DIR")
	if dir == "" {
		t.Skip("MACVM_DEB_DIR is not set: `make test-macos-kernel` fetches Debian's kernel packages and runs this test")
	}
	matches, _ := filepath.Glob(filepath.Join(dir, glob))
	for _, m := range matches {
		if exclude == "" || !strings.Contains(filepath.Base(m), exclude) {
			return m
		}
	}
	t.Fatalf("no %s in MACVM_DEB_DIR=%s (run hack/fetch-kernel-debs.sh %s)", glob, dir, dir)
	return ""
}

// TestRealDebARM64 turns Debian's arm64 cloud kernel package into what
// Virtualization.framework boots on Apple silicon: an uncompressed Image
// (magic ARMd at 0x38) and the modules of the vz devices.
func TestRealDebARM64(t *testing.T) {
	deb := realDeb(t, "linux-image-*-cloud-arm64_*_arm64.deb", "")
	out := filepath.Join(t.TempDir(), "vz-arm64")
	res, err := unpackKernelDeb(deb, out, vzModules)
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(filepath.Join(out, "Image"))
	if err != nil {
		t.Fatal(err)
	}
	if string(img[0x38:0x3c]) != "ARMd" {
		t.Fatalf("Image magic at 0x38: %q, want ARMd", img[0x38:0x3c])
	}
	// Header: image_size at 0x10 covers the file, flags bit 0 = little endian.
	if size := binary.LittleEndian.Uint64(img[0x10:]); size < uint64(len(img)) {
		t.Errorf("image_size %d smaller than the file (%d)", size, len(img))
	}
	if flags := binary.LittleEndian.Uint64(img[0x18:]); flags&1 != 0 {
		t.Errorf("big-endian kernel (flags %#x)", flags)
	}
	list, err := os.ReadFile(filepath.Join(out, "modules.list"))
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, m := range strings.Fields(string(list)) {
		have[m] = true
		if _, err := bootimage.ReadModule(filepath.Join(out, "modules", m+".ko")); err != nil {
			t.Errorf("module %s: %v", m, err)
		}
	}
	for _, m := range []string{"virtio_pci", "virtio_console", "vsock", "vmw_vsock_virtio_transport", "virtiofs", "fuse", "virtio_blk", "overlay", "erofs"} {
		if !have[m] {
			t.Errorf("modules.list lacks %s: %s", m, list)
		}
	}
	// The initramfs orders the vsock channel first.
	mods, err := bootimage.ReadModuleDir(filepath.Join(out, "modules"))
	if err != nil {
		t.Fatal(err)
	}
	order, err := bootimage.LoadOrderFirst(mods, vzFirstModules)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range order {
		pos[m.Name] = i
	}
	if pos["vmw_vsock_virtio_transport"] > pos["overlay"] || pos["vsock"] > pos["vmw_vsock_virtio_transport"] {
		t.Errorf("load order does not put the vsock channel first: %v", pos)
	}
	t.Logf("%s %s: Image %d bytes, %d modules", res.pkg, res.version, len(img), res.modules)
}

// TestRealDebAMD64Boots unpacks Debian's generic amd64 kernel package and
// boots the result under QEMU with the modules it collected: the guest
// init loads them from the initramfs and answers on the agent port.
func TestRealDebAMD64Boots(t *testing.T) {
	deb := realDeb(t, "linux-image-*-amd64_*_amd64.deb", "cloud")
	out := filepath.Join(t.TempDir(), "amd64")
	// QEMU's microvm needs virtio-mmio where a Mac has PCI.
	res, err := unpackKernelDeb(deb, out, append([]string{"virtio_mmio"}, vzModules...))
	if err != nil {
		t.Fatal(err)
	}
	if res.warning != "" {
		t.Fatalf("warning: %s", res.warning)
	}
	bz, err := os.ReadFile(filepath.Join(out, "bzImage"))
	if err != nil || !bootimage.IsBzImage(bz) {
		t.Fatalf("bzImage: %v", err)
	}

	tmp := t.TempDir()
	initBin := filepath.Join(tmp, "testinit")
	build := exec.Command("go", "build", "-o", initBin, "../../pkg/vm/testdata/testinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building testinit: %v\n%s", err, b)
	}
	mods, err := bootimage.ReadModuleDir(filepath.Join(out, "modules"))
	if err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(tmp, "initrd.img")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := bootimage.WriteInitrd(f, bootimage.InitrdSpec{Init: initBin, Modules: mods}); err != nil {
		t.Fatal(err)
	}
	f.Close()

	m, err := vm.NewQEMU(vm.Config{
		ID: "deb-boot", StateDir: t.TempDir(), Kernel: filepath.Join(out, "vmlinux"), Initrd: initrd,
		KernelArgs: []string{"macvm.test=hello"}, CPUs: 1, MemoryMiB: 256,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() {
		kill, cancel := context.WithCancel(context.Background())
		cancel()
		m.Stop(kill)
	}()
	conn, err := m.AgentConn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(90 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "hello\n" {
		t.Fatalf("first line from the guest: %q %v\n%s", line, err, m.ConsoleTail(2048))
	}
	t.Logf("%s %s booted under QEMU: hello after %s", res.pkg, res.version, time.Since(m.BootStarted()).Round(time.Millisecond))
}

// TestRealDebARM64Boots boots what `make boot-macos` builds from Debian's
// arm64 package — the Image, the vz modules and the real guest agent built
// for arm64 — under qemu-system-aarch64 (TCG), and talks to the agent. The
// channel is virtio-serial here (QEMU on this host has no vhost-vsock), so
// this proves the kernel, the modules, their order and the arm64 agent;
// the vsock channel itself needs a Mac.
func TestRealDebARM64Boots(t *testing.T) {
	deb := realDeb(t, "linux-image-*-cloud-arm64_*_arm64.deb", "")
	qemu, err := exec.LookPath("qemu-system-aarch64")
	if err != nil {
		t.Fatalf("qemu-system-aarch64: %v (apt-get install qemu-system-arm; hack/fetch-kernel-debs.sh does)", err)
	}
	tmp := t.TempDir()
	out := filepath.Join(tmp, "vz-arm64")
	if _, err := unpackKernelDeb(deb, out, vzModules); err != nil {
		t.Fatal(err)
	}
	agentBin := filepath.Join(tmp, "guest-agent")
	build := exec.Command("go", "build", "-trimpath", "-o", agentBin, "../../guest-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=arm64")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the arm64 agent: %v\n%s", err, b)
	}
	mods, err := bootimage.ReadModuleDir(filepath.Join(out, "modules"))
	if err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(tmp, "initrd.img")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := bootimage.WriteInitrd(f, bootimage.InitrdSpec{Init: agentBin, Modules: mods, First: vzFirstModules}); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// The chardev's socket path must fit sun_path: keep it short.
	sockDir, err := os.MkdirTemp("", "armboot")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "agent.sock")
	console := filepath.Join(tmp, "console.log")
	cmd := exec.Command(qemu, "-M", "virt", "-cpu", "cortex-a57", "-m", "512", "-smp", "1",
		"-nographic", "-nodefaults", "-no-reboot",
		"-kernel", filepath.Join(out, "Image"), "-initrd", initrd,
		// The console is hvc0 on a virtio console, as under
		// Virtualization.framework: its driver is one of the modules, so
		// the agent starts without a console and must attach it later.
		"-append", "console=hvc0 panic=-1 rdinit=/init macvm.channel=serial:agent",
		"-chardev", "file,id=con,path="+console,
		"-device", "virtio-serial-pci,id=vs1", "-device", "virtconsole,bus=vs1.0,chardev=con",
		"-device", "virtio-rng-pci",
		"-chardev", "socket,id=c0,path="+sock+",server=on,wait=off",
		"-device", "virtio-serial-pci,id=vs0", "-device", "virtserialport,bus=vs0.0,chardev=c0,name=agent")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()
	consoleTail := func() string {
		b, _ := os.ReadFile(console)
		if len(b) > 2048 {
			b = b[len(b)-2048:]
		}
		return string(b)
	}

	var conn net.Conn
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if conn, err = net.Dial("unix", sock); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("qemu's agent socket: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c, err := guest.NewClient(ctx, conn)
	if err != nil {
		t.Fatalf("agent: %v\nconsole:\n%s", err, consoleTail())
	}
	defer c.Close()
	info, err := c.Info(ctx, &emptypb.Empty{})
	if err != nil {
		t.Fatalf("Info: %v\nconsole:\n%s", err, consoleTail())
	}
	if !strings.HasSuffix(info.GetKernelRelease(), "-arm64") {
		t.Errorf("kernel release %q, want Debian's arm64 kernel", info.GetKernelRelease())
	}
	t.Logf("arm64 agent answered Info %s after qemu exec: kernel %s, %d CPUs, cgroup controllers %v",
		time.Since(start).Round(time.Millisecond), info.GetKernelRelease(), info.GetCpus(), info.GetCgroupControllers())
	// Every module loaded, and the agent's log reached hvc0 once
	// virtio_console was in (its log lines are written as it goes).
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(consoleTail(), "boot: modules loaded") && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	if tail := consoleTail(); !strings.Contains(tail, "macvm-agent: ") || !strings.Contains(tail, "boot: modules loaded") || strings.Contains(tail, "boot: modules: ") {
		t.Errorf("hvc0 console does not show the agent loading every module:\n%s", tail)
	}
	if _, err := c.Shutdown(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Errorf("qemu after the agent's power-off: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Errorf("the guest did not power off\n%s", consoleTail())
	}
}
