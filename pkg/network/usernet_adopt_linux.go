package network

import (
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/pkg/vm"
)

// Adopting a pooled VM's datagram NIC (vm.NIC.Adopt). A pooled qemu's NIC
// is one end of a socket pair the pool daemon made; the stack's end is
// the helper's, already serving (ports published). Unix datagram sockets
// can be connected again: both ends get an address and are connected to
// each other, so qemu's frames go to the helper and the helper's to qemu,
// with no copy and no restart of the helper. The shim's own guest end
// stays, connected to nothing, for reclaim.
//
// The addresses are paths in a directory only its owner (root) may enter,
// not abstract names: an abstract name is reachable by every process in
// the host's network namespace, and while a socket is between peers
// (disconnected, before its new connect) anything may send to it, which
// would let any local user put frames on a container's NIC.

// adoptable sets nic's Adopt and Reclaim.
func (u *UserNet) adoptable(nic vm.NIC) vm.NIC {
	nic.Adopt = u.adopt
	nic.Reclaim = u.reclaim
	return nic
}

// adopt connects the helper's end and the pooled VM's socket s.File to
// each other. On error the helper's end is still connected to u.guest.
func (u *UserNet) adopt(s vm.StandIn) error {
	if s.Kind != vm.NICDatagram || s.File == nil {
		return fmt.Errorf("user-space network: adopt a %s NIC: want a datagram socket: %w", s.Kind, errdefs.ErrInvalidArgument)
	}
	if u.adopted != nil {
		return fmt.Errorf("user-space network: a pooled VM's NIC is adopted already: %w", errdefs.ErrAlreadyExists)
	}
	if typ, err := unix.GetsockoptInt(int(s.File.Fd()), unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_DGRAM {
		return fmt.Errorf("user-space network: the pooled VM's NIC is no datagram socket: %w", errdefs.ErrInvalidArgument)
	}
	dir, err := u.socketDir()
	if err != nil {
		return err
	}
	theirs, err := dupFile(s.File, "usernet-pooled")
	if err != nil {
		return err
	}
	if err := connectPair(dir, theirs, u.host, u.guest); err != nil {
		theirs.Close()
		return fmt.Errorf("user-space network: adopting the pooled VM's NIC: %w", err)
	}
	u.adopted = theirs
	return nil
}

// reclaim connects the helper's end and u.guest to each other again.
func (u *UserNet) reclaim() error {
	if u.adopted == nil {
		return nil
	}
	if err := connectPair(u.sockDir, u.guest, u.host, nil); err != nil {
		return fmt.Errorf("user-space network: reclaiming the NIC from the pooled VM: %w", err)
	}
	u.adopted.Close()
	u.adopted = nil
	return nil
}

// socketDir makes (once) the private directory the sockets' addresses
// live in; Close removes it.
func (u *UserNet) socketDir() (string, error) {
	if u.sockDir != "" {
		return u.sockDir, nil
	}
	dir, err := os.MkdirTemp("", "macvm-usernet-") // mode 0700
	if err != nil {
		return "", fmt.Errorf("user-space network: directory for the NIC's socket names: %w", err)
	}
	u.sockDir = dir
	return dir, nil
}

// connectPair connects the unix datagram sockets nic (the hypervisor's)
// and stack to each other, giving each an address in dir first. A
// datagram socket only accepts connections (and datagrams) from its peer
// when it has one, so nic is disconnected first, then stack connected to
// it, then it to stack. If that last step fails, stack is connected back
// to restore (its previous peer, which still names it), when set.
func connectPair(dir string, nic, stack, restore *os.File) error {
	addr := func(f *os.File, name string) (unix.Sockaddr, error) {
		fd := int(f.Fd())
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return nil, fmt.Errorf("getsockname: %w", err)
		}
		// An unbound socket's name reads as "" or "@" (x/sys shows a
		// leading NUL as @); one bound by an earlier adopt or
		// reclaim keeps its path.
		if ua, ok := sa.(*unix.SockaddrUnix); ok && ua.Name != "" && ua.Name != "@" {
			return sa, nil
		}
		path := filepath.Join(dir, name)
		sa = &unix.SockaddrUnix{Name: path}
		if err := unix.Bind(fd, sa); err != nil {
			return nil, fmt.Errorf("bind %s: %w", path, err)
		}
		return sa, nil
	}
	nicAddr, err := addr(nic, "vm")
	if err != nil {
		return err
	}
	stackAddr, err := addr(stack, "stack")
	if err != nil {
		return err
	}
	var restoreAddr unix.Sockaddr
	if restore != nil {
		if restoreAddr, err = addr(restore, "own"); err != nil {
			return err
		}
	}
	if err := disconnect(nic); err != nil {
		return fmt.Errorf("disconnect the NIC: %w", err)
	}
	if err := unix.Connect(int(stack.Fd()), nicAddr); err != nil {
		return fmt.Errorf("connect the stack to the NIC: %w", err)
	}
	if err := unix.Connect(int(nic.Fd()), stackAddr); err != nil {
		err = fmt.Errorf("connect the NIC to the stack: %w", err)
		if restore != nil {
			if rerr := unix.Connect(int(stack.Fd()), restoreAddr); rerr != nil {
				err = fmt.Errorf("%w; and the stack back: %w", err, rerr)
			}
		}
		return err
	}
	return nil
}

// disconnect dissolves a datagram socket's association (connect with
// AF_UNSPEC).
func disconnect(f *os.File) error {
	sa := unix.RawSockaddr{Family: unix.AF_UNSPEC}
	_, _, e := unix.Syscall(unix.SYS_CONNECT, f.Fd(), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa.Family))
	if e != 0 {
		return e
	}
	return nil
}

func dupFile(f *os.File, name string) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup: %w", err)
	}
	return os.NewFile(uintptr(fd), name), nil
}
