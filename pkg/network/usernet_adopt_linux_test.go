package network

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/pkg/vm"
)

func dgramPair(t *testing.T, a, b string) (*os.File, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	fa, fb := os.NewFile(uintptr(fds[0]), a), os.NewFile(uintptr(fds[1]), b)
	t.Cleanup(func() { fa.Close(); fb.Close() })
	return fa, fb
}

// passes sends one datagram from one socket and expects it on the other.
func passes(t *testing.T, from, to *os.File, msg string) bool {
	t.Helper()
	if _, err := unix.Write(int(from.Fd()), []byte(msg)); err != nil {
		t.Logf("send %q from %s: %v", msg, from.Name(), err)
		return false
	}
	fds := []unix.PollFd{{Fd: int32(to.Fd()), Events: unix.POLLIN}}
	if n, err := unix.Poll(fds, int((10 * time.Second).Milliseconds())); err != nil || n == 0 {
		t.Logf("%q sent from %s did not reach %s", msg, from.Name(), to.Name())
		return false
	}
	buf := make([]byte, 64)
	n, err := unix.Read(int(to.Fd()), buf)
	return err == nil && string(buf[:n]) == msg
}

// TestAdoptDatagram: the stack's end of a user-space network, connected
// to the shim's own guest end, is connected to a pooled VM's socket
// instead (both ways, one datagram per frame), and back by Reclaim.
func TestAdoptDatagram(t *testing.T) {
	stack, guest := dgramPair(t, "stack", "guest")
	ours, qemu := dgramPair(t, "daemon", "qemu")
	u := &UserNet{guest: guest, host: stack}
	t.Cleanup(func() { os.RemoveAll(u.sockDir) }) // Close's part: no helper runs here
	nic := u.NIC()
	if nic.Adopt == nil || nic.Reclaim == nil || nic.File != guest {
		t.Fatalf("NIC %+v: want the guest end, adoptable", nic)
	}
	if err := nic.Adopt(vm.StandIn{Kind: vm.NICTap, File: qemu}); err == nil {
		t.Error("a tap stand-in was adopted by the user-space network")
	}
	if err := nic.Adopt(vm.StandIn{Kind: vm.NICDatagram, File: qemu}); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	qemu.Close() // the caller's copy goes; the VM's stays (u.adopted)
	if !passes(t, u.adopted, stack, "frame-from-vm") || !passes(t, stack, u.adopted, "frame-to-vm") {
		t.Error("frames do not flow between the stack and the pooled VM's socket")
	}
	if _, err := unix.Write(int(ours.Fd()), []byte("x")); err == nil {
		t.Error("the daemon's end still reaches the adopted socket")
	}
	if err := nic.Adopt(vm.StandIn{Kind: vm.NICDatagram, File: guest}); err == nil {
		t.Error("a second Adopt succeeded")
	}
	if err := nic.Reclaim(); err != nil {
		t.Fatalf("Reclaim: %v", err)
	}
	if !passes(t, guest, stack, "frame-from-own") || !passes(t, stack, guest, "frame-to-own") {
		t.Error("after Reclaim, frames do not flow between the stack and the shim's own end")
	}
	if err := nic.Reclaim(); err != nil {
		t.Errorf("a second Reclaim: %v", err)
	}
}

// TestAdoptedNamesPrivate: the sockets an adopt connects are named by
// paths in a directory only root may enter (no abstract names, which any
// process of the host's network namespace can reach), and Close removes
// it.
func TestAdoptedNamesPrivate(t *testing.T) {
	stack, guest := dgramPair(t, "stack", "guest")
	_, qemu := dgramPair(t, "daemon", "qemu")
	u := &UserNet{guest: guest, host: stack}
	if err := u.NIC().Adopt(vm.StandIn{Kind: vm.NICDatagram, File: qemu}); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	st, err := os.Stat(u.sockDir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("socket directory %q: %v, mode %v: want 0700", u.sockDir, err, st)
	}
	for _, f := range []*os.File{stack, qemu, guest} {
		sa, err := unix.Getsockname(int(f.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		name := sa.(*unix.SockaddrUnix).Name
		if filepath.Dir(name) != u.sockDir {
			t.Errorf("%s is named %q: want a path in %s", f.Name(), name, u.sockDir)
		}
	}
	// Close with a helper that has exited already.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	u.stdin, u.done = w, make(chan struct{})
	close(u.done)
	if err := u.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := os.Stat(u.sockDir); !os.IsNotExist(err) {
		t.Errorf("socket directory %s after Close: %v, want it gone", u.sockDir, err)
	}
}
