//go:build linux

// Package transport_test runs the host<->guest transport against a real
// virtio-serial port in a QEMU guest, with the host disconnecting and
// reconnecting, which only the real device can show: the guest port's
// EOF-then-hang-up behaviour, writes queued while no host is connected,
// and stale bytes in both directions.
//
// The guest runs testinit (in this directory) as /init, packed into a copy
// of the project's initramfs so that it gets the same kernel modules. The
// chardev is a listening socket path, not the fd the shim uses, so that
// the test can reconnect.
package transport_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/macvm/macvm/internal/testutil"
	"github.com/macvm/macvm/pkg/bootimage"
	"github.com/macvm/macvm/pkg/guest/transport"
	"github.com/macvm/macvm/pkg/vm"
)

// bootDir returns MACVM_BOOT_DIR or fails: this test must not pass
// silently on a machine without boot files.
func bootDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("MACVM_BOOT_DIR")
	if dir == "" {
		t.Fatal("MACVM_BOOT_DIR is not set: run `make test-vm` (it builds _output/boot and sets it)")
	}
	return dir
}

// testInitrd builds testinit and packs it as /init into a copy of the boot
// directory's initramfs, keeping its modules and load list.
func testInitrd(t *testing.T, boot, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "testinit")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "./testinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build testinit: %v\n%s", err, out)
	}
	init, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(filepath.Join(boot, "initrd.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	outPath := filepath.Join(dir, "initrd.img")
	out, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	r := bootimage.NewCPIOReader(bufio.NewReader(in))
	w := bootimage.NewCPIOWriter(out)
	replaced := false
	for {
		e, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read initrd: %v", err)
		}
		if e.Name == "init" {
			e.Data, replaced = init, true
		}
		if err := w.WriteEntry(*e); err != nil {
			t.Fatal(err)
		}
	}
	if !replaced {
		t.Fatal("initrd has no /init to replace")
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return outPath
}

type guestVM struct {
	sock, console string
	cmd           *exec.Cmd
}

func bootVM(t *testing.T) *guestVM {
	boot := bootDir(t)
	dir := t.TempDir()
	initrd := testInitrd(t, boot, dir)
	v := &guestVM{sock: filepath.Join(dir, "agent.sock"), console: filepath.Join(dir, "console.log")}
	args := []string{
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-accel", "tcg", "-cpu", "qemu64,+rdrand",
		"-M", "microvm,x-option-roms=off,pit=off,pic=off", "-smp", "2", "-m", "256",
		"-kernel", filepath.Join(boot, "vmlinux"), "-initrd", initrd,
		"-append", vm.KernelCmdline("ttyS0", vm.HostTSCKHz(), nil),
		"-chardev", "file,id=console,path=" + v.console, "-serial", "chardev:console",
		"-chardev", "socket,id=agent,path=" + v.sock + ",server=on,wait=off",
		"-device", "virtio-serial-device,id=vser0",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name=" + vm.AgentPortName,
	}
	v.cmd = exec.Command("qemu-system-x86_64", args...)
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	t.Cleanup(func() {
		v.cmd.Process.Kill()
		v.cmd.Wait()
		if t.Failed() {
			t.Logf("console:\n%s", v.consoleTail())
		}
	})
	return v
}

func (v *guestVM) consoleTail() string {
	b, _ := os.ReadFile(v.console)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// connect dials the chardev socket (QEMU creates it shortly after start)
// and runs the host handshake.
func (v *guestVM) connect(t *testing.T) *transport.Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var conn net.Conn
	for {
		var err error
		conn, err = net.Dial("unix", v.sock)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("dial %s: %v", v.sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	start := time.Now()
	s, err := transport.Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Logf("handshake took %v", time.Since(start).Round(time.Millisecond))
	return s
}

func request(t *testing.T, s *transport.Session, name string, body []byte) []byte {
	t.Helper()
	c, err := s.Open(name)
	if err != nil {
		t.Fatalf("Open(%q): %v", name, err)
	}
	return testutil.Exchange(t, c, body, 2*time.Minute)
}

func sessions(t *testing.T, s *transport.Session) int {
	t.Helper()
	n, err := strconv.Atoi(string(request(t, s, "sessions", nil)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestVirtioSerialReconnect(t *testing.T) {
	v := bootVM(t)
	s := v.connect(t)
	if got := request(t, s, "echo", []byte("hello")); string(got) != "hello" {
		t.Fatalf("echo = %q", got)
	}
	if n := sessions(t, s); n != 1 {
		t.Errorf("guest sessions = %d, want 1", n)
	}

	// Integrity both ways (the guest hashes and generates under TCG, so
	// this is not a speed test).
	const size = 16 << 20
	payload := make([]byte, size)
	rand.NewChaCha8([32]byte{3}).Read(payload)
	sum := sha256.Sum256(payload)
	if got := string(request(t, s, "sink", payload)); got != hex.EncodeToString(sum[:]) {
		t.Errorf("guest sha256 of %d bytes = %s, want %x", size, got, sum)
	}
	got := request(t, s, fmt.Sprintf("source:%d", size), nil)
	want := make([]byte, size)
	rand.NewChaCha8([32]byte{7}).Read(want)
	if !bytes.Equal(got, want) {
		t.Errorf("guest->host: got %d bytes, want %d identical bytes", len(got), size)
	}

	// Throughput of the transport itself.
	const bulk = 64 << 20
	start := time.Now()
	if got := string(request(t, s, "discard", make([]byte, bulk))); got != strconv.Itoa(bulk) {
		t.Errorf("guest discarded %s bytes, want %d", got, bulk)
	}
	t.Logf("host->guest: %.0f MiB/s", bulk/(1<<20)/time.Since(start).Seconds())
	start = time.Now()
	if got := request(t, s, fmt.Sprintf("zeros:%d", bulk), nil); len(got) != bulk {
		t.Errorf("guest->host: got %d bytes, want %d", len(got), bulk)
	}
	t.Logf("guest->host: %.0f MiB/s", bulk/(1<<20)/time.Since(start).Seconds())

	// A clean reconnect: the guest sees EOF, its session ends, and the next
	// Connect is answered by a new one.
	s.Close()
	s = v.connect(t)
	if n := sessions(t, s); n != 2 {
		t.Errorf("guest sessions after a reconnect = %d, want 2", n)
	}

	// Disconnect in the middle of transfers both ways: frames are cut, the
	// guest keeps writing with no host connected (those bytes reach the
	// next host), and the host's half-sent data is left in the port.
	src, err := s.Open(fmt.Sprintf("source:%d", size))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(src, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	sink, err := s.Open("sink")
	if err != nil {
		t.Fatal(err)
	}
	go sink.Write(payload)
	time.Sleep(200 * time.Millisecond)
	s.Close()

	for i := 3; i <= 5; i++ {
		s = v.connect(t)
		if got := request(t, s, "echo", []byte("after stale")); string(got) != "after stale" {
			t.Fatalf("echo after reconnect %d = %q", i, got)
		}
		n := sessions(t, s)
		if n < i {
			t.Errorf("guest sessions = %d, want at least %d", n, i)
		}
		t.Logf("reconnect %d: guest at session %d", i, n)
		s.Close()
	}
	if !strings.Contains(v.consoleTail(), "testinit: session") {
		t.Errorf("console does not show the guest's sessions")
	}
}
