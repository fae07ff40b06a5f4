package network

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/containers/gvisor-tap-vsock/pkg/types"
	"github.com/containers/gvisor-tap-vsock/pkg/virtualnetwork"
	"golang.org/x/sys/unix"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// The user-space network's fixed layout: every VM has its own stack, so
// the addresses never clash between VMs. HostIP is the host's loopback as
// the guest sees it (NAT to 127.0.0.1); the stack's DNS server at GatewayIP
// answers for the DNSZone names and forwards the rest to the host's
// resolver.
const (
	UserSubnet  = "192.168.127.0/24"
	GatewayIP   = "192.168.127.1"
	GuestIP     = "192.168.127.2"
	HostIP      = "192.168.127.254"
	DNSZone     = "macvm.internal."
	userPrefix  = 24
	userMTU     = 1500
	gatewayMAC  = "5a:94:ef:e4:0c:dd"
	guestMACStr = "5a:94:ef:e4:0c:ee"
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

// UserNet is one VM's user-space network: a gvisor-tap-vsock virtual
// network (gateway, NAT to the host's network, DNS) whose switch port is
// the host end of a datagram socket pair; the other end is the VM's NIC.
type UserNet struct {
	vn     *virtualnetwork.VirtualNetwork
	guest  *os.File // the VM's end, handed to the hypervisor
	host   net.Conn // the stack's end
	cancel context.CancelFunc
	done   chan struct{} // closed when the switch stops reading

	mu        sync.Mutex // guards listeners and closed
	listeners []net.Listener
	closed    bool
}

// NewUserNet starts a stack for one VM and publishes ports. Close stops it.
func NewUserNet(ports []PortForward) (u *UserNet, retErr error) {
	vn, err := virtualnetwork.New(&types.Configuration{
		MTU:               userMTU,
		Subnet:            UserSubnet,
		GatewayIP:         GatewayIP,
		GatewayMacAddress: gatewayMAC,
		// The guest's address is static (ConfigureNetwork), but the
		// lease keeps the stack's DHCP server from handing it out.
		DHCPStaticLeases:  map[string]string{GuestIP: guestMACStr},
		GatewayVirtualIPs: []string{HostIP},
		NAT:               map[string]string{HostIP: "127.0.0.1"},
		DNS: []types.Zone{{
			Name: DNSZone,
			Records: []types.Record{
				{Name: "host", IP: net.ParseIP(HostIP)},
				{Name: "gateway", IP: net.ParseIP(GatewayIP)},
			},
		}},
	})
	if err != nil {
		return nil, fmt.Errorf("user-space network: %w", err)
	}
	// One frame per datagram, as QEMU's dgram netdev and the framework's
	// file handle attachment send them (gvisor-tap-vsock's vfkit protocol).
	// macOS has no SOCK_CLOEXEC: mark both ends under the fork lock, as
	// the standard library does, so no child started meanwhile inherits them.
	syscall.ForkLock.RLock()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
	if err == nil {
		unix.CloseOnExec(fds[0])
		unix.CloseOnExec(fds[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("user-space network: socketpair: %w", err)
	}
	// Room for bursts: the default buffers drop frames under TCP load.
	for _, fd := range fds {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	hostFile := os.NewFile(uintptr(fds[0]), "usernet-host")
	guest := os.NewFile(uintptr(fds[1]), "usernet-guest")
	host, err := net.FileConn(hostFile)
	hostFile.Close()
	if err != nil {
		guest.Close()
		return nil, fmt.Errorf("user-space network: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	u = &UserNet{vn: vn, guest: guest, host: host, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(u.done)
		// Returns when the connection is closed (Close) or fails.
		_ = vn.AcceptVfkit(ctx, host)
	}()
	defer func() {
		if retErr != nil {
			u.Close()
		}
	}()
	for _, p := range ports {
		if err := u.publish(p); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// NIC is the VM's device: the datagram end, with the guest's MAC.
func (u *UserNet) NIC() vm.NIC {
	mac, _ := net.ParseMAC(guestMACStr)
	return vm.NIC{Kind: vm.NICDatagram, File: u.guest, MAC: mac}
}

// GuestConfig is what the agent sets up: eth0 with the guest address and a
// default route through the stack's gateway.
func (u *UserNet) GuestConfig() *agent.ConfigureNetworkRequest {
	return &agent.ConfigureNetworkRequest{
		Interfaces: []*agent.NetworkInterface{{
			DeviceMac: guestMACStr,
			Name:      "eth0",
			Mac:       guestMACStr,
			Mtu:       userMTU,
			Addresses: []string{GuestIP + "/" + strconv.Itoa(userPrefix)},
		}},
		Routes: []*agent.Route{{Gateway: GatewayIP, Device: "eth0"}},
	}
}

// Published returns the host addresses the published ports listen on, in
// the order given (a port 0 in the request shows the one chosen).
func (u *UserNet) Published() []net.Addr {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []net.Addr
	for _, l := range u.listeners {
		out = append(out, l.Addr())
	}
	return out
}

// publish listens on the host and relays each connection into the guest
// through the stack (the guest sees it come from the gateway).
func (u *UserNet) publish(p PortForward) error {
	l, err := net.Listen("tcp", p.HostAddr)
	if err != nil {
		return fmt.Errorf("publish %s -> guest port %d: %w: %w", p.HostAddr, p.GuestPort, errdefs.ErrUnavailable, err)
	}
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		l.Close()
		return fmt.Errorf("user-space network closed: %w", errdefs.ErrFailedPrecondition)
	}
	u.listeners = append(u.listeners, l)
	u.mu.Unlock()
	target := net.JoinHostPort(GuestIP, strconv.Itoa(p.GuestPort))
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed
			}
			go u.relay(c, target)
		}
	}()
	return nil
}

func (u *UserNet) relay(c net.Conn, target string) {
	defer c.Close()
	g, err := u.vn.DialContextTCP(context.Background(), target)
	if err != nil {
		return // the guest refused: the client sees the connection close
	}
	defer g.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _ = io.Copy(g, c)
		closeWrite(g)
	}()
	_, _ = io.Copy(c, g)
	closeWrite(c)
	wg.Wait()
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// Close stops publishing ports and disconnects the stack from the VM. The
// gvisor stack itself has no shutdown; its idle goroutines go with the shim.
func (u *UserNet) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	u.closed = true
	ls := u.listeners
	u.listeners = nil
	u.mu.Unlock()
	var errs []error
	for _, l := range ls {
		errs = append(errs, l.Close())
	}
	u.cancel()
	errs = append(errs, u.host.Close(), u.guest.Close())
	<-u.done
	return errors.Join(errs...)
}
