package transport

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// hangupPoll is how often a virtio-serial port with no host behind it is
// retried. The port reports EOF and then hang-ups without end while the
// host chardev has no client, so there is nothing to wait on but time.
const hangupPoll = 20 * time.Millisecond

// OpenVirtioSerial opens the guest's virtio-serial port called name (the
// virtserialport's name= on the QEMU command line) as a channel for Accept.
//
// Without udev there is no /dev/virtio-ports/NAME, so the port is found by
// its /sys/class/virtio-ports/*/name; its device node is created if /dev
// lacks it. The channel turns the port's endless EOF/hang-up state while no
// host is connected into blocking reads, after reporting io.EOF once when a
// host that had sent data goes away (so that the session over it ends and
// the agent calls Accept again). It supports SetDeadline, which is how
// Accept and Session.Close interrupt it. It fails with ErrNotFound if no
// such port exists (yet: the driver may still be probing).
func OpenVirtioSerial(name string) (io.ReadWriteCloser, error) {
	dirs, err := filepath.Glob("/sys/class/virtio-ports/*")
	if err != nil {
		return nil, fmt.Errorf("%w: transport: %w", errdefs.ErrInternal, err)
	}
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "name"))
		if err != nil || strings.TrimSpace(string(b)) != name {
			continue
		}
		dev := filepath.Join("/dev", filepath.Base(dir))
		if err := ensureDevNode(dev, filepath.Join(dir, "dev")); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("%w: transport: open virtio-serial port %q: %w", errdefs.ErrUnavailable, name, err)
		}
		return newSerialPort(f), nil
	}
	return nil, fmt.Errorf("%w: transport: no virtio-serial port named %q", errdefs.ErrNotFound, name)
}

// ensureDevNode creates the character device dev from sysfs' "major:minor"
// when devtmpfs has not (or is not mounted at /dev).
func ensureDevNode(dev, sysDev string) error {
	if _, err := os.Stat(dev); err == nil {
		return nil
	}
	b, err := os.ReadFile(sysDev)
	if err != nil {
		return fmt.Errorf("%w: transport: %w", errdefs.ErrNotFound, err)
	}
	var major, minor uint32
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); err != nil {
		return fmt.Errorf("%w: transport: parse %s: %w", errdefs.ErrInternal, sysDev, err)
	}
	if err := unix.Mknod(dev, unix.S_IFCHR|0o600, int(unix.Mkdev(major, minor))); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%w: transport: mknod %s: %w", errdefs.ErrInternal, dev, err)
	}
	return nil
}

// serialPort is an open virtio-serial port. Reads are made by one session
// at a time (Accept, then the session it starts).
type serialPort struct {
	f *os.File

	mu sync.Mutex // guards readDeadline and connected
	// readDeadline is kept here as well as in f because the hang-up wait
	// below is a sleep, not a poll the runtime could interrupt.
	readDeadline time.Time
	// connected is set by a read that returned data and cleared when EOF
	// is reported: EOF is reported once per host, then waited out.
	connected bool
	// kick wakes the hang-up wait when the deadline changes.
	kick chan struct{}
}

func newSerialPort(f *os.File) *serialPort {
	return &serialPort{f: f, kick: make(chan struct{}, 1)}
}

func (p *serialPort) Read(b []byte) (int, error) {
	for {
		n, err := p.f.Read(b)
		if n > 0 {
			p.mu.Lock()
			p.connected = true
			p.mu.Unlock()
			return n, nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		p.mu.Lock()
		wasConnected, deadline := p.connected, p.readDeadline
		p.connected = false
		p.mu.Unlock()
		if wasConnected {
			return 0, io.EOF
		}
		if err := p.waitHangup(deadline); err != nil {
			return 0, err
		}
	}
}

// waitHangup sleeps one poll interval, or less if the read deadline comes
// first or changes.
func (p *serialPort) waitHangup(deadline time.Time) error {
	d := hangupPoll
	if !deadline.IsZero() {
		left := time.Until(deadline)
		if left <= 0 {
			return os.ErrDeadlineExceeded
		}
		d = min(d, left)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-p.kick:
	}
	return nil
}

func (p *serialPort) Write(b []byte) (int, error) { return p.f.Write(b) }

func (p *serialPort) Close() error { return p.f.Close() }

func (p *serialPort) SetDeadline(t time.Time) error {
	if err := p.SetReadDeadline(t); err != nil {
		return err
	}
	return p.SetWriteDeadline(t)
}

func (p *serialPort) SetReadDeadline(t time.Time) error {
	p.mu.Lock()
	p.readDeadline = t
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
	return ignoreNoDeadline(p.f.SetReadDeadline(t))
}

func (p *serialPort) SetWriteDeadline(t time.Time) error {
	return ignoreNoDeadline(p.f.SetWriteDeadline(t))
}

// ignoreNoDeadline accepts a port the runtime could not register with its
// poller: the hang-up wait still honours read deadlines, only a read or
// write blocked inside the kernel cannot be interrupted.
func ignoreNoDeadline(err error) error {
	if errors.Is(err, os.ErrNoDeadline) {
		return nil
	}
	return err
}
