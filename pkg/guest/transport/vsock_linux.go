package transport

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// OpenVsock dials the host (CID 2) on port over AF_VSOCK and returns the
// channel for Accept: under Virtualization.framework the host listens and
// the agent dials, once at boot and again after each lost connection (see
// redialChannel). The first dial is made here, so a missing transport
// shows at once: it fails with ErrNotFound while the kernel has no vsock
// transport (the virtio vsock module is not loaded yet) and ErrUnavailable
// while the host is not listening; callers retry both for a while.
func OpenVsock(port uint32) (io.ReadWriteCloser, error) {
	dial := func() (net.Conn, error) { return DialVsock(unix.VMADDR_CID_HOST, port) }
	c, err := dial()
	if err != nil {
		return nil, err
	}
	return newRedialChannel(dial, c), nil
}

// DialVsock connects a vsock stream socket to cid:port. Pure Go over
// x/sys/unix: the net package cannot wrap AF_VSOCK sockets (FileConn
// rejects the family), so the connection is an *os.File on the runtime
// poller, which gives it deadlines. The connect itself blocks for at most
// the kernel's vsock connect timeout (2 s by default).
func DialVsock(cid, port uint32) (net.Conn, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: transport: vsock socket: %w", errdefs.ErrNotFound, err)
	}
	sa := &unix.SockaddrVM{CID: cid, Port: port}
	for {
		err = unix.Connect(fd, sa)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("transport: connect vsock %d:%d: %w", cid, port, vsockDialError(err))
	}
	local := vsockAddr{cid: unix.VMADDR_CID_ANY}
	if lsa, err := unix.Getsockname(fd); err == nil {
		if vm, ok := lsa.(*unix.SockaddrVM); ok {
			local = vsockAddr{cid: vm.CID, port: vm.Port}
		}
	}
	c, err := newFileConn(fd, "vsock", local, vsockAddr{cid: cid, port: port})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// vsockDialError classifies a connect errno for callers that retry.
func vsockDialError(errno error) error {
	if errors.Is(errno, unix.ENODEV) || errors.Is(errno, unix.EAFNOSUPPORT) {
		// No transport for that CID: the guest's virtio vsock driver is
		// not up (yet).
		return fmt.Errorf("%w: no vsock transport: %w", errdefs.ErrNotFound, errno)
	}
	return fmt.Errorf("%w: %w", errdefs.ErrUnavailable, errno)
}

// vsockAddr is a vsock address as a net.Addr.
type vsockAddr struct{ cid, port uint32 }

func (a vsockAddr) Network() string { return "vsock" }
func (a vsockAddr) String() string {
	return strconv.FormatUint(uint64(a.cid), 10) + ":" + strconv.FormatUint(uint64(a.port), 10)
}

// fileConn is a connected stream socket of a family the net package does
// not know, as a net.Conn with deadlines and CloseWrite.
type fileConn struct {
	f             *os.File
	local, remote net.Addr
}

// newFileConn takes ownership of the connected socket fd.
func newFileConn(fd int, name string, local, remote net.Addr) (*fileConn, error) {
	// Non-blocking, so os.NewFile puts it on the poller: reads park the
	// goroutine instead of a thread, and deadlines work.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%w: transport: %w", errdefs.ErrInternal, err)
	}
	return &fileConn{f: os.NewFile(uintptr(fd), name), local: local, remote: remote}, nil
}

func (c *fileConn) Read(b []byte) (int, error)         { return c.f.Read(b) }
func (c *fileConn) Write(b []byte) (int, error)        { return c.f.Write(b) }
func (c *fileConn) Close() error                       { return c.f.Close() }
func (c *fileConn) LocalAddr() net.Addr                { return c.local }
func (c *fileConn) RemoteAddr() net.Addr               { return c.remote }
func (c *fileConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *fileConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *fileConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// CloseWrite half-closes the connection: the peer reads EOF.
func (c *fileConn) CloseWrite() error {
	rc, err := c.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_WR) }); err != nil {
		return err
	}
	return serr
}
