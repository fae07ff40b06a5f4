// Package userstack is the user-space network stack behind a VM's NIC when
// the container shares the host's network (pkg/network.UserNet): a
// gvisor-tap-vsock virtual network (gateway, NAT to the host, DNS) whose
// switch port is one end of a datagram socket pair, the VM's NIC the other.
//
// It runs in its own process, macvm-usernet (cmd/macvm-usernet), not in the
// shim: gvisor-tap-vsock links github.com/google/gopacket/layers, whose
// package initialisation fills 7 MiB of lookup tables. In the shim, every
// shim paid that (6.4 MiB of its 27.5 MiB RSS, measured by pagemap),
// whether or not its VM used this network.
package userstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containers/gvisor-tap-vsock/pkg/types"
	"github.com/containers/gvisor-tap-vsock/pkg/virtualnetwork"

	"github.com/macvm/macvm/pkg/network"
)

// Stack is one VM's network.
type Stack struct {
	vn     *virtualnetwork.VirtualNetwork
	host   net.Conn // the switch's end of the datagram socket pair
	cancel context.CancelFunc
	done   chan struct{} // closed when the switch stops reading

	mu        sync.Mutex // guards listeners and closed
	listeners []net.Listener
	closed    bool
}

// Start serves the network on host (a connected datagram socket: one frame
// per datagram, as QEMU's dgram netdev and the framework's file handle
// attachment send them) and publishes ports. Close stops it.
func Start(host net.Conn, ports []network.PortForward) (_ *Stack, retErr error) {
	vn, err := virtualnetwork.New(&types.Configuration{
		MTU:               network.UserMTU,
		Subnet:            network.UserSubnet,
		GatewayIP:         network.GatewayIP,
		GatewayMacAddress: network.GatewayMAC,
		// The guest's address is static (ConfigureNetwork), but the
		// lease keeps the stack's DHCP server from handing it out.
		DHCPStaticLeases:  map[string]string{network.GuestIP: network.GuestMAC},
		GatewayVirtualIPs: []string{network.HostIP},
		NAT:               map[string]string{network.HostIP: "127.0.0.1"},
		DNS: []types.Zone{{
			Name: network.DNSZone,
			Records: []types.Record{
				{Name: "host", IP: net.ParseIP(network.HostIP)},
				{Name: "gateway", IP: net.ParseIP(network.GatewayIP)},
			},
		}},
	})
	if err != nil {
		return nil, fmt.Errorf("user-space network: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Stack{vn: vn, host: host, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		// Returns when the connection is closed (Close) or fails.
		_ = vn.AcceptVfkit(ctx, host)
	}()
	defer func() {
		if retErr != nil {
			s.Close()
		}
	}()
	for _, p := range ports {
		if err := s.publish(p); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Published returns the host addresses the published ports listen on, in
// the order given (a port 0 in the request shows the one chosen).
func (s *Stack) Published() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []net.Addr
	for _, l := range s.listeners {
		out = append(out, l.Addr())
	}
	return out
}

// publish listens on the host and relays each connection into the guest
// through the stack (the guest sees it come from the gateway).
func (s *Stack) publish(p network.PortForward) error {
	l, err := net.Listen("tcp", p.HostAddr)
	if err != nil {
		return fmt.Errorf("publish %s -> guest port %d: %w: %w", p.HostAddr, p.GuestPort, errdefs.ErrUnavailable, err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return fmt.Errorf("user-space network closed: %w", errdefs.ErrFailedPrecondition)
	}
	s.listeners = append(s.listeners, l)
	s.mu.Unlock()
	target := net.JoinHostPort(network.GuestIP, strconv.Itoa(p.GuestPort))
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed
			}
			go s.relay(c, target)
		}
	}()
	return nil
}

func (s *Stack) relay(c net.Conn, target string) {
	defer c.Close()
	g, err := s.vn.DialContextTCP(context.Background(), target)
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
// gvisor stack itself has no shutdown; its idle goroutines go with the
// process.
func (s *Stack) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	ls := s.listeners
	s.listeners = nil
	s.mu.Unlock()
	var errs []error
	for _, l := range ls {
		errs = append(errs, l.Close())
	}
	s.cancel()
	errs = append(errs, s.host.Close())
	<-s.done
	return errors.Join(errs...)
}
