package service

import (
	"errors"
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
)

// listen binds a unix socket at path; the path stays when it is closed.
func listen(t *testing.T, path string) *net.UnixListener {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	t.Cleanup(func() { l.Close() })
	return l
}

// ownSocket binds a socket in a temp dir and makes it h's shim's own, as
// the shim's bootstrap does; it returns the socket's path.
func ownSocket(t *testing.T, h *harness) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "shim.sock")
	listen(t, path)
	sock, err := socketAt(path)
	if err != nil {
		t.Fatal(err)
	}
	h.svc.socket = sock
	return path
}

// TestShutdownReleasesSocket: the Shutdown that ends the shim unlinks its
// socket before it returns, while the VM's teardown still keeps the shim
// alive; creates are refused from then on; and the shim's exit leaves alone
// the socket another shim has bound at the same path meanwhile.
func TestShutdownReleasesSocket(t *testing.T) {
	h := newHarness(t, nil)
	path := ownSocket(t, h)

	// A teardown in flight keeps the shim's shutdown (shutdownAll) waiting.
	teardown := make(chan struct{})
	h.svc.mu.Lock()
	h.svc.teardowns = append(h.svc.teardowns, teardown)
	h.svc.mu.Unlock()

	if _, err := h.svc.Shutdown(h.ctx, &taskAPI.ShutdownRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket after Shutdown returned: %v, want it unlinked", err)
	}
	select {
	case <-h.sd.Done():
		t.Fatal("the shim ended before its VM's teardown")
	default:
	}

	_, err := h.svc.Create(h.ctx, &taskAPI.CreateTaskRequest{ID: "late", Bundle: h.bundle("late", nil), Options: h.opts})
	if err = errgrpc.ToNative(err); !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "shim is shutting down") {
		t.Fatalf("create after Shutdown: %v, want ErrUnavailable (shim is shutting down)", err)
	}

	// A new shim (a container with the same ID) binds the path while this
	// one still tears down; this one's exit must not unlink it.
	listen(t, path)
	close(teardown)
	select {
	case <-h.sd.Done():
	case <-time.After(time.Minute):
		t.Fatal("the shim did not end after its teardown")
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the new shim's socket after the old shim ended: %v", err)
	}
	c.Close()
	h.mu.Lock()
	n := len(h.machines)
	h.mu.Unlock()
	if n != 0 {
		t.Errorf("a create after Shutdown made %d VMs", n)
	}
}

// TestShutdownBusyKeepsSocket: Shutdown while a container remains (a pod's
// later containers share the shim) is a no-op: socket and creates stay.
func TestShutdownBusyKeepsSocket(t *testing.T) {
	h := newHarness(t, nil)
	path := ownSocket(t, h)
	h.create("c1", nil)
	if _, err := h.svc.Shutdown(h.ctx, &taskAPI.ShutdownRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("socket after a Shutdown of a busy shim: %v", err)
	}
	h.create("c2", nil)
}

// TestReleaseLeavesReplacedSocket: a socket some other shim put at the path
// (a start action that judged this shim dead) is not this shim's to remove.
func TestReleaseLeavesReplacedSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shim.sock")
	l := listen(t, path)
	sock, err := socketAt(path)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	listen(t, path)
	if err := sock.release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("release removed another shim's socket: %v", err)
	}
	// Its own socket it removes; a missing one is no error.
	own, err := socketAt(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := own.release(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("release kept the shim's own socket: %v", err)
	}
	if err := own.release(); err != nil {
		t.Fatalf("release of a removed socket: %v", err)
	}
}

// TestShutdownNowRefusesExec: Shutdown with Now ends the shim though a
// container remains: its socket goes at once, and an exec is refused
// rather than started in a VM about to be torn down.
func TestShutdownNowRefusesExec(t *testing.T) {
	h := newHarness(t, nil)
	path := ownSocket(t, h)
	h.create("c1", nil)
	if _, err := h.svc.Shutdown(h.ctx, &taskAPI.ShutdownRequest{ID: "c1", Now: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket after Shutdown{Now}: %v, want it unlinked", err)
	}
	if err := h.exec("c1", "e1", nil); !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "shim is shutting down") {
		t.Fatalf("exec after Shutdown{Now}: %v, want ErrUnavailable (shim is shutting down)", err)
	}
	select {
	case <-h.sd.Done():
	case <-time.After(time.Minute):
		t.Fatal("Shutdown{Now} did not end the shim")
	}
}

// TestDisownLibrarySocketCleanup: in a shim process (where containerd's
// shim library defines -socket) the flag is pointed at a path that cannot
// exist, so the library's exit cleanup removes nothing.
func TestDisownLibrarySocketCleanup(t *testing.T) {
	fs := flag.CommandLine
	if fs.Lookup("socket") == nil {
		// What the shim library's parseFlags defines (shim.Run).
		var v string
		fs.StringVar(&v, "socket", "", "socket path to serve")
	}
	disownLibrarySocketCleanup()
	got := fs.Lookup("socket").Value.String()
	if got != releasedSocketFlag {
		t.Fatalf("-socket after disown: %q, want %q", got, releasedSocketFlag)
	}
	if _, err := os.Lstat(got); !errors.Is(err, syscall.ENOTDIR) {
		t.Fatalf("%s must be a path that can never exist (a non-directory on the way): %v", got, err)
	}
}
