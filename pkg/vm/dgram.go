package vm

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// NewDatagramPair makes the two ends of a NICDatagram NIC: a connected
// AF_UNIX SOCK_DGRAM socket pair carrying one Ethernet frame per datagram,
// with buffers sized for a container's traffic (the defaults drop frames
// under TCP load). stack is the network stack's end, nic the hypervisor's.
// Both are close-on-exec; macOS has no SOCK_CLOEXEC, so they are marked
// under the fork lock, as the standard library does, and no child started
// meanwhile inherits them. The user-space network and both backends'
// template stand-ins make their pairs here, so a pooled VM's socket is
// the same as the one a container's network would have given it.
func NewDatagramPair(stackName, nicName string) (stack, nic *os.File, err error) {
	syscall.ForkLock.RLock()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
	if err == nil {
		unix.CloseOnExec(fds[0])
		unix.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, fmt.Errorf("datagram NIC: socketpair: %w", err)
	}
	for _, fd := range fds {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	return os.NewFile(uintptr(fds[0]), stackName), os.NewFile(uintptr(fds[1]), nicName), nil
}
