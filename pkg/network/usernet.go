package network

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// The user-space network's fixed layout: every VM has its own stack, so
// the addresses never clash between VMs. HostIP is the host's loopback as
// the guest sees it (NAT to 127.0.0.1); the stack's DNS server at GatewayIP
// answers for the DNSZone names and forwards the rest to the host's
// resolver.
const (
	UserSubnet = "192.168.127.0/24"
	GatewayIP  = "192.168.127.1"
	GuestIP    = "192.168.127.2"
	HostIP     = "192.168.127.254"
	DNSZone    = "macvm.internal."
	UserMTU    = 1500
	GatewayMAC = "5a:94:ef:e4:0c:dd"
	GuestMAC   = "5a:94:ef:e4:0c:ee"
	userPrefix = 24
)

// PortForward publishes a guest TCP port on the host: connections to
// HostAddr (host:port) are relayed into the guest's GuestPort.
type PortForward struct {
	HostAddr  string
	GuestPort int
}

// ParsePorts reads a comma-separated list of [HOSTIP:]HOSTPORT:GUESTPORT[/tcp]
// (the io.macvm.net.ports annotation). The host IP defaults to 127.0.0.1:
// publishing on every host address must be asked for (0.0.0.0:8080:80).
func ParsePorts(s string) ([]PortForward, error) {
	var out []PortForward
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		spec, proto, _ := strings.Cut(item, "/")
		if proto != "" && proto != "tcp" {
			return nil, fmt.Errorf("port %q: only tcp is forwarded: %w", item, errdefs.ErrNotImplemented)
		}
		parts := strings.Split(spec, ":")
		host := "127.0.0.1"
		switch len(parts) {
		case 2:
		case 3:
			host = parts[0]
			parts = parts[1:]
			if net.ParseIP(host) == nil {
				return nil, fmt.Errorf("port %q: %q is not an IP address: %w", item, host, errdefs.ErrInvalidArgument)
			}
		default:
			return nil, fmt.Errorf("port %q: want [HOSTIP:]HOSTPORT:GUESTPORT: %w", item, errdefs.ErrInvalidArgument)
		}
		hp, err1 := strconv.Atoi(parts[0])
		gp, err2 := strconv.Atoi(parts[1])
		if err1 != nil || err2 != nil || hp < 0 || hp > 65535 || gp < 1 || gp > 65535 {
			return nil, fmt.Errorf("port %q: ports must be 1-65535 (host port 0: any free one): %w", item, errdefs.ErrInvalidArgument)
		}
		out = append(out, PortForward{HostAddr: net.JoinHostPort(host, parts[0]), GuestPort: gp})
	}
	return out, nil
}

// UserNetHelper is the macvm-usernet binary that runs the stack. Empty:
// macvm-usernet beside the running executable (the shim's install
// directory), else on PATH.
var UserNetHelper string

// userNetHelper resolves UserNetHelper.
func userNetHelper() (string, error) {
	if UserNetHelper != "" {
		return UserNetHelper, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "macvm-usernet")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("macvm-usernet")
	if err != nil {
		return "", fmt.Errorf("user-space network: macvm-usernet (install it beside the shim): %w: %w", errdefs.ErrNotFound, err)
	}
	return p, nil
}

// userNetStartTimeout bounds the helper's start (a Go process and the
// stack's set-up: milliseconds idle, much longer on a loaded host).
const userNetStartTimeout = time.Minute

// UserNet is one VM's user-space network: a gvisor-tap-vsock virtual
// network (gateway, NAT to the host's network, DNS) whose switch port is
// the host end of a datagram socket pair; the other end is the VM's NIC.
// The stack runs in a macvm-usernet process (package userstack says why),
// which holds the host end and the published ports' listeners.
type UserNet struct {
	guest *os.File // the VM's end, handed to the hypervisor
	// host is a copy of the helper's end: adopting a pooled VM's socket
	// (usernet_adopt_linux.go) connects it elsewhere.
	host *os.File
	// adopted is the pooled VM's socket the helper's end is connected to
	// instead of guest (nil: none).
	adopted *os.File
	// sockDir holds the sockets' names while adopted ("": none made).
	sockDir string
	cmd     *exec.Cmd // macvm-usernet
	stdin   io.WriteCloser
	done    chan struct{} // closed when the helper has exited (cmd.Wait returned)
	// published is what the helper listens on; set before NewUserNet returns.
	published []net.Addr

	mu     sync.Mutex // guards closed
	closed bool
}

// NewUserNet starts a stack for one VM and publishes ports. Close stops it.
func NewUserNet(ports []PortForward) (_ *UserNet, retErr error) {
	helper, err := userNetHelper()
	if err != nil {
		return nil, err
	}
	// One frame per datagram, as QEMU's dgram netdev and the framework's
	// file handle attachment send them (gvisor-tap-vsock's vfkit protocol).
	host, guest, err := vm.NewDatagramPair("usernet-host", "usernet-guest")
	if err != nil {
		return nil, fmt.Errorf("user-space network: %w", err)
	}
	args := make([]string, 0, len(ports))
	for _, p := range ports {
		args = append(args, p.HostAddr+"="+strconv.Itoa(p.GuestPort))
	}
	cmd := exec.Command(helper, args...)
	cmd.ExtraFiles = []*os.File{host} // fd 3
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		guest.Close()
		host.Close()
		return nil, fmt.Errorf("user-space network: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		guest.Close()
		host.Close()
		return nil, fmt.Errorf("user-space network: %w", err)
	}
	if err := cmd.Start(); err != nil {
		guest.Close()
		host.Close()
		return nil, fmt.Errorf("user-space network: starting %s: %w", helper, err)
	}
	u := &UserNet{guest: guest, host: host, cmd: cmd, stdin: stdin, done: make(chan struct{})}
	lines := make(chan []string, 1)
	go func() {
		// Read the start-up lines, then drain (the helper writes no more).
		var got []string
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			got = append(got, sc.Text())
			if t := sc.Text(); t == "ready" || strings.HasPrefix(t, "error ") {
				break
			}
		}
		lines <- got
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
		close(u.done)
	}()
	defer func() {
		if retErr != nil {
			u.Close()
		}
	}()
	var got []string
	select {
	case got = <-lines:
	case <-time.After(userNetStartTimeout):
		return nil, fmt.Errorf("user-space network: %s did not start within %v: %w", helper, userNetStartTimeout, errdefs.ErrUnavailable)
	}
	for _, l := range got {
		switch {
		case strings.HasPrefix(l, "published "):
			a, err := net.ResolveTCPAddr("tcp", strings.TrimPrefix(l, "published "))
			if err != nil {
				return nil, fmt.Errorf("user-space network: %s said %q: %w", helper, l, errdefs.ErrUnknown)
			}
			u.published = append(u.published, a)
		case strings.HasPrefix(l, "error "):
			// Failures to serve are mostly a port that cannot be
			// published (in use, no such address).
			return nil, fmt.Errorf("user-space network: %s: %w", strings.TrimPrefix(l, "error "), errdefs.ErrUnavailable)
		}
	}
	if len(got) == 0 || got[len(got)-1] != "ready" || len(u.published) != len(ports) {
		return nil, fmt.Errorf("user-space network: %s exited without serving (said %q): %w", helper, got, errdefs.ErrUnknown)
	}
	return u, nil
}

// NIC is the VM's device: the datagram end, with the guest's MAC.
func (u *UserNet) NIC() vm.NIC {
	mac, _ := net.ParseMAC(GuestMAC)
	return u.adoptable(vm.NIC{Kind: vm.NICDatagram, File: u.guest, MAC: mac})
}

// GuestConfig is what the agent sets up: eth0 with the guest address and a
// default route through the stack's gateway.
func (u *UserNet) GuestConfig() *agent.ConfigureNetworkRequest {
	return &agent.ConfigureNetworkRequest{
		Interfaces: []*agent.NetworkInterface{{
			DeviceMac: GuestMAC,
			Name:      "eth0",
			Mac:       GuestMAC,
			Mtu:       UserMTU,
			Addresses: []string{GuestIP + "/" + strconv.Itoa(userPrefix)},
		}},
		Routes: []*agent.Route{{Gateway: GatewayIP, Device: "eth0"}},
	}
}

// Published returns the host addresses the published ports listen on, in
// the order given (a port 0 in the request shows the one chosen).
func (u *UserNet) Published() []net.Addr {
	return append([]net.Addr(nil), u.published...)
}

// userNetStopTimeout is how long Close waits for the helper to exit after
// its stdin closed before killing it.
const userNetStopTimeout = 10 * time.Second

// Close stops the helper (its listeners close with it) and closes the
// VM's end of the socket pair.
func (u *UserNet) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	u.closed = true
	u.mu.Unlock()
	var errs []error
	_ = u.stdin.Close()
	select {
	case <-u.done:
	case <-time.After(userNetStopTimeout):
		_ = u.cmd.Process.Kill()
		<-u.done
		errs = append(errs, fmt.Errorf("user-space network: macvm-usernet did not exit within %v of its stdin closing: killed", userNetStopTimeout))
	}
	errs = append(errs, u.guest.Close(), u.host.Close())
	if u.adopted != nil {
		u.adopted.Close()
	}
	if u.sockDir != "" {
		errs = append(errs, os.RemoveAll(u.sockDir))
	}
	return errors.Join(errs...)
}
