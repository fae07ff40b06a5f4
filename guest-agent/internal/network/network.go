// Package network configures the guest's NICs from what the host read in
// the pod's network: the VM is the pod's network namespace, so the agent
// gives its virtio-net interfaces the identity (MAC, name, MTU, addresses)
// of the interfaces they stand in for, and installs the routes and
// neighbours. It speaks rtnetlink through github.com/vishvananda/netlink
// (static, pure Go: no ip(8) in the guest).
package network

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sort"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Interface is one NIC to configure (see agent.NetworkInterface).
type Interface struct {
	// DeviceMAC finds the NIC; when nil, Index does (position among the
	// non-loopback interfaces in ifindex order).
	DeviceMAC net.HardwareAddr
	Index     int
	Name      string
	MAC       net.HardwareAddr
	MTU       int
	Addresses []string
}

// Route is one route; an empty Destination is the default route.
type Route struct {
	Destination string
	Gateway     string
	Device      string
	Source      string
	Metric      int
}

// Neighbour is a permanent ARP/NDP entry.
type Neighbour struct {
	IP     string
	MAC    net.HardwareAddr
	Device string
}

// Config is the whole network of the VM.
type Config struct {
	Interfaces []Interface
	Routes     []Route
	Neighbours []Neighbour
}

// Configurator applies a Config once the NIC driver is there.
type Configurator struct {
	// ready, if set, is closed once the kernel modules (virtio_net among
	// them) are loaded: before that the NICs do not exist.
	ready <-chan struct{}
	// handle is the netlink handle of the namespace to configure.
	handle *netlink.Handle
}

// New returns a configurator for the current network namespace that waits
// for ready (nil: do not wait) before looking for NICs.
func New(ready <-chan struct{}) (*Configurator, error) {
	// Route sockets only: the guest kernel lacks other families (xfrm).
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return &Configurator{ready: ready, handle: h}, nil
}

// Apply configures every interface (rename, MAC, MTU, up, addresses), then
// the routes in order, then the neighbours. It stops at the first failure:
// the host fails the pod's creation, so a partial network never runs.
func (c *Configurator) Apply(ctx context.Context, cfg Config) error {
	if c.ready != nil {
		select {
		case <-c.ready:
		case <-ctx.Done():
			return fmt.Errorf("waiting for the guest's NIC driver: %w", ctx.Err())
		}
	}
	links, err := c.nics()
	if err != nil {
		return err
	}
	// Resolve every interface before renaming any: a rename could make a
	// later lookup ambiguous.
	chosen := make([]netlink.Link, len(cfg.Interfaces))
	used := map[int]bool{}
	for i, ifc := range cfg.Interfaces {
		l, err := pick(links, ifc)
		if err != nil {
			return err
		}
		if used[l.Attrs().Index] {
			return fmt.Errorf("interface %d (%s): its NIC is already configured by another entry: %w", i, ifc.Name, errdefs.ErrInvalidArgument)
		}
		used[l.Attrs().Index] = true
		chosen[i] = l
	}
	for i, ifc := range cfg.Interfaces {
		if err := c.configure(chosen[i], ifc); err != nil {
			return err
		}
	}
	for _, r := range cfg.Routes {
		if err := c.addRoute(r); err != nil {
			return err
		}
	}
	for _, n := range cfg.Neighbours {
		if err := c.addNeighbour(n); err != nil {
			return err
		}
	}
	return nil
}

// nics lists the guest's non-loopback interfaces in ifindex order, which
// is the order the kernel probed the devices in.
func (c *Configurator) nics() ([]netlink.Link, error) {
	all, err := c.handle.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []netlink.Link
	for _, l := range all {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Attrs().Index < out[j].Attrs().Index })
	return out, nil
}

func pick(links []netlink.Link, ifc Interface) (netlink.Link, error) {
	if len(ifc.DeviceMAC) > 0 {
		for _, l := range links {
			if bytes.Equal(l.Attrs().HardwareAddr, ifc.DeviceMAC) {
				return l, nil
			}
		}
		return nil, fmt.Errorf("no NIC with MAC %s in the guest: %w", ifc.DeviceMAC, errdefs.ErrNotFound)
	}
	if ifc.Index < 0 || ifc.Index >= len(links) {
		return nil, fmt.Errorf("NIC %d asked for, the guest has %d: %w", ifc.Index, len(links), errdefs.ErrNotFound)
	}
	return links[ifc.Index], nil
}

func (c *Configurator) configure(l netlink.Link, ifc Interface) error {
	name := l.Attrs().Name
	wrap := func(what string, err error) error {
		return fmt.Errorf("interface %s: %s: %w", name, what, err)
	}
	// Name and MAC change only while the link is down.
	if err := c.handle.LinkSetDown(l); err != nil {
		return wrap("down", err)
	}
	if ifc.Name != "" && ifc.Name != name {
		if err := c.handle.LinkSetName(l, ifc.Name); err != nil {
			return wrap("rename to "+ifc.Name, err)
		}
		name = ifc.Name
	}
	if len(ifc.MAC) > 0 {
		if err := c.handle.LinkSetHardwareAddr(l, ifc.MAC); err != nil {
			return wrap("set MAC "+ifc.MAC.String(), err)
		}
	}
	if ifc.MTU > 0 {
		if err := c.handle.LinkSetMTU(l, ifc.MTU); err != nil {
			return wrap(fmt.Sprintf("set MTU %d", ifc.MTU), err)
		}
	}
	if err := c.handle.LinkSetUp(l); err != nil {
		return wrap("up", err)
	}
	for _, a := range ifc.Addresses {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			return wrap("address", fmt.Errorf("%q is not CIDR: %w", a, errdefs.ErrInvalidArgument))
		}
		if addr.IP.To4() == nil {
			// The address is the pod's, already unique on its network:
			// duplicate detection would only delay it by seconds.
			addr.Flags |= unix.IFA_F_NODAD
		}
		if err := c.handle.AddrAdd(l, addr); err != nil {
			return wrap("add address "+a, err)
		}
	}
	return nil
}

func (c *Configurator) addRoute(r Route) error {
	route := netlink.Route{Priority: r.Metric}
	if r.Device != "" {
		l, err := c.handle.LinkByName(r.Device)
		if err != nil {
			return fmt.Errorf("route %s: device %s: %w", describe(r), r.Device, errdefs.ErrNotFound)
		}
		route.LinkIndex = l.Attrs().Index
	}
	if r.Destination != "" {
		_, dst, err := net.ParseCIDR(r.Destination)
		if err != nil {
			return fmt.Errorf("route %s: destination is not CIDR: %w", describe(r), errdefs.ErrInvalidArgument)
		}
		route.Dst = dst
	}
	if r.Gateway != "" {
		route.Gw = net.ParseIP(r.Gateway)
		if route.Gw == nil {
			return fmt.Errorf("route %s: gateway is not an IP: %w", describe(r), errdefs.ErrInvalidArgument)
		}
	} else {
		route.Scope = netlink.SCOPE_LINK
	}
	if r.Source != "" {
		route.Src = net.ParseIP(r.Source)
		if route.Src == nil {
			return fmt.Errorf("route %s: source is not an IP: %w", describe(r), errdefs.ErrInvalidArgument)
		}
	}
	// Replace, not add: the kernel already made the link routes of the
	// interface addresses, which CNI reports as routes too.
	if err := c.handle.RouteReplace(&route); err != nil {
		return fmt.Errorf("route %s: %w", describe(r), err)
	}
	return nil
}

func describe(r Route) string {
	dst := r.Destination
	if dst == "" {
		dst = "default"
	}
	if r.Gateway != "" {
		dst += " via " + r.Gateway
	}
	if r.Device != "" {
		dst += " dev " + r.Device
	}
	return dst
}

func (c *Configurator) addNeighbour(n Neighbour) error {
	ip := net.ParseIP(n.IP)
	if ip == nil {
		return fmt.Errorf("neighbour %q is not an IP: %w", n.IP, errdefs.ErrInvalidArgument)
	}
	l, err := c.handle.LinkByName(n.Device)
	if err != nil {
		return fmt.Errorf("neighbour %s: device %s: %w", n.IP, n.Device, errdefs.ErrNotFound)
	}
	family := netlink.FAMILY_V4
	if ip.To4() == nil {
		family = netlink.FAMILY_V6
	}
	if err := c.handle.NeighSet(&netlink.Neigh{
		LinkIndex:    l.Attrs().Index,
		Family:       family,
		State:        netlink.NUD_PERMANENT,
		IP:           ip,
		HardwareAddr: n.MAC,
	}); err != nil {
		return fmt.Errorf("neighbour %s dev %s: %w", n.IP, n.Device, err)
	}
	return nil
}
