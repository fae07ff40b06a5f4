package network

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/internal/tap"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// tapPrefix names the taps macvm creates in a pod's namespace: macvm3 is
// the VM's side of the interface with ifindex 3.
const tapPrefix = "macvm"

// Netns is a network namespace prepared by CNI whose interfaces the VM
// takes over: for each one a tap in the namespace whose traffic tc
// redirects to and from the CNI interface (Kata Containers' tcfilter
// model), so the VM's NIC, with the interface's MAC, IPs, routes and MTU,
// is on the CNI network while the namespace stays as CNI made it.
type Netns struct {
	path string
	ifs  []takenOver
	req  *agent.ConfigureNetworkRequest
}

// takenOver is one CNI interface and the tap that carries it.
type takenOver struct {
	name, tap string
	mac       net.HardwareAddr
	file      *os.File // the open tap, for the hypervisor
	// adopted is the pooled VM's tap moved in for this interface
	// (netns_adopt_linux.go), which the CNI interface's frames go to
	// instead of tap; "" when none.
	adopted string
}

// OpenNetns reads the namespace at path and wires a tap to each of its
// interfaces. A path that is no network namespace, or one without an
// interface to take over, fails with ErrNotFound / ErrInvalidArgument.
// On error nothing is left in the namespace.
func OpenNetns(path string) (*Netns, error) {
	ns, err := openNS(path)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	n := &Netns{path: path}
	err = inNetns(ns, func() error { return n.setUp() })
	if err != nil {
		return nil, err
	}
	return n, nil
}

// openNS opens path and checks that it is a network namespace.
func openNS(path string) (*os.File, error) {
	if path == "" || !strings.HasPrefix(path, "/") {
		return nil, fmt.Errorf("network namespace path %q is not absolute: %w", path, errdefs.ErrInvalidArgument)
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("network namespace %s: %w", path, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	// NS_GET_NSTYPE answers CLONE_NEWNET for a network namespace file.
	typ, err := unix.IoctlRetInt(int(f.Fd()), unix.NS_GET_NSTYPE)
	if err != nil || typ != unix.CLONE_NEWNET {
		f.Close()
		return nil, fmt.Errorf("%s is not a network namespace: %w", path, errdefs.ErrInvalidArgument)
	}
	return f, nil
}

// inNetns runs fn on a thread that joined ns. The thread is never given
// back (the goroutine ends locked), so Go discards it rather than let
// other goroutines run in the pod's namespace. Never start a hypervisor
// from fn: its parent-death signal would fire when this thread exits.
func inNetns(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// setUp runs inside the namespace.
func (n *Netns) setUp() (retErr error) {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("network namespace %s: list links: %w", n.path, err)
	}
	defer func() {
		if retErr != nil {
			n.tearDown()
			for _, t := range n.ifs {
				t.file.Close()
			}
			n.ifs = nil
		}
	}()
	req := &agent.ConfigureNetworkRequest{}
	var linkRoutes, gwRoutes []*agent.Route
	for _, l := range links {
		a := l.Attrs()
		if a.Flags&net.FlagLoopback != 0 || len(a.HardwareAddr) != 6 || strings.HasPrefix(a.Name, tapPrefix) {
			continue
		}
		tap, file, err := n.wire(l)
		if err != nil {
			return err
		}
		n.ifs = append(n.ifs, takenOver{name: a.Name, tap: tap, mac: a.HardwareAddr, file: file})
		ifc := &agent.NetworkInterface{
			DeviceMac: a.HardwareAddr.String(), Name: a.Name, Mac: a.HardwareAddr.String(), Mtu: uint32(a.MTU),
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("network namespace %s: %s: addresses: %w", n.path, a.Name, err)
		}
		for _, ad := range addrs {
			// The guest makes its own link-local address from the MAC.
			if ad.IP.IsLinkLocalUnicast() {
				continue
			}
			ifc.Addresses = append(ifc.Addresses, ad.IPNet.String())
		}
		req.Interfaces = append(req.Interfaces, ifc)
		routes, err := netlink.RouteList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("network namespace %s: %s: routes: %w", n.path, a.Name, err)
		}
		for _, r := range routes {
			if r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) {
				continue
			}
			ar := &agent.Route{Device: a.Name, Metric: uint32(r.Priority)}
			if r.Dst != nil && !isDefault(r.Dst) {
				ar.Destination = r.Dst.String()
			}
			if r.Src != nil {
				ar.Source = r.Src.String()
			}
			if r.Gw != nil {
				ar.Gateway = r.Gw.String()
				gwRoutes = append(gwRoutes, ar)
			} else {
				linkRoutes = append(linkRoutes, ar)
			}
		}
	}
	if len(n.ifs) == 0 {
		return fmt.Errorf("network namespace %s has no interface to give the VM (only loopback?): %w", n.path, errdefs.ErrNotFound)
	}
	// A gateway is reachable only once the link routes are in.
	req.Routes = append(linkRoutes, gwRoutes...)
	n.req = req
	return nil
}

func isDefault(dst *net.IPNet) bool {
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

// wire creates the tap for l, up, with l's MTU, and redirects every frame
// arriving on either one out of the other.
func (n *Netns) wire(l netlink.Link) (string, *os.File, error) {
	a := l.Attrs()
	tap := fmt.Sprintf("%s%d", tapPrefix, a.Index)
	file, err := openTap(tap)
	if err != nil {
		return "", nil, fmt.Errorf("network namespace %s: tap for %s: %w", n.path, a.Name, err)
	}
	fail := func(what string, err error) (string, *os.File, error) {
		file.Close()
		// Deleting the tap drops its qdisc and filters with it.
		if t, lerr := netlink.LinkByName(tap); lerr == nil {
			netlink.LinkDel(t)
		}
		return "", nil, fmt.Errorf("network namespace %s: %s <-> %s: %s: %w", n.path, a.Name, tap, what, err)
	}
	t, err := netlink.LinkByName(tap)
	if err != nil {
		return fail("find tap", err)
	}
	if err := netlink.LinkSetMTU(t, a.MTU); err != nil {
		return fail("MTU", err)
	}
	if err := netlink.LinkSetUp(t); err != nil {
		return fail("up", err)
	}
	if err := redirect(l, t); err != nil {
		return fail("redirect", err)
	}
	if err := redirect(t, l); err != nil {
		netlink.QdiscDel(ingress(a.Index))
		return fail("redirect back", err)
	}
	return tap, file, nil
}

func ingress(index int) *netlink.Ingress {
	return &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: index, Parent: netlink.HANDLE_INGRESS, Handle: netlink.MakeHandle(0xffff, 0),
	}}
}

// redirect sends every frame that arrives on from out of to: an ingress
// qdisc on from with a match-all u32 filter whose mirred action redirects
// to to's egress.
func redirect(from, to netlink.Link) error {
	if err := netlink.QdiscAdd(ingress(from.Attrs().Index)); err != nil {
		return fmt.Errorf("ingress qdisc on %s: %w", from.Attrs().Name, err)
	}
	filter := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from.Attrs().Index,
			Parent:    netlink.MakeHandle(0xffff, 0),
			Protocol:  unix.ETH_P_ALL,
		},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      to.Attrs().Index,
		}},
	}
	if err := netlink.FilterAdd(filter); err != nil {
		netlink.QdiscDel(ingress(from.Attrs().Index))
		return fmt.Errorf("redirect filter %s -> %s: %w", from.Attrs().Name, to.Attrs().Name, err)
	}
	return nil
}

// openTap creates a tap in the current thread's network namespace and
// returns its open queue.
func openTap(name string) (*os.File, error) { return tap.Open(name) }

// NICs are the VM's devices, one tap per taken-over interface, with the
// interface's MAC.
func (n *Netns) NICs() []vm.NIC {
	out := make([]vm.NIC, len(n.ifs))
	for i, t := range n.ifs {
		out[i] = vm.NIC{Kind: vm.NICTap, File: t.file, MAC: t.mac,
			Adopt:   func(s vm.StandIn) error { return n.adopt(i, s) },
			Reclaim: func() error { return n.reclaim(i) },
		}
	}
	return out
}

// GuestConfig is what the agent sets up: the interfaces with their names,
// MACs, MTUs and addresses, and the namespace's routes.
func (n *Netns) GuestConfig() *agent.ConfigureNetworkRequest { return n.req }

// Close closes the taps and removes them and the redirections from the
// namespace, leaving it as CNI left it. A namespace already gone (CNI's
// DEL ran first) is not an error.
func (n *Netns) Close() error {
	var errs []error
	for _, t := range n.ifs {
		errs = append(errs, t.file.Close())
	}
	ns, err := openNS(n.path)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return errors.Join(errs...)
		}
		return errors.Join(append(errs, err)...)
	}
	defer ns.Close()
	errs = append(errs, inNetns(ns, func() error { return n.tearDown() }))
	return errors.Join(errs...)
}

// tearDown runs inside the namespace: it deletes the taps (their qdiscs
// and filters go with them) and the ingress qdiscs of the CNI interfaces.
func (n *Netns) tearDown() error {
	var errs []error
	for _, t := range n.ifs {
		for _, name := range []string{t.tap, t.adopted} {
			if name == "" {
				continue
			}
			if l, err := netlink.LinkByName(name); err == nil {
				if err := netlink.LinkDel(l); err != nil {
					errs = append(errs, fmt.Errorf("delete %s: %w", name, err))
				}
			}
		}
		if l, err := netlink.LinkByName(t.name); err == nil {
			if err := netlink.QdiscDel(ingress(l.Attrs().Index)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("ingress qdisc of %s: %w", t.name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// CreateNetns creates an empty network namespace pinned at path (a new
// file, bind-mounted like `ip netns add` does), for a pod whose spec asks
// for a new namespace that OCI hooks (nerdctl's CNI hook) then fill.
func CreateNetns(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("pin for a network namespace: %w", err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		// The thread leaves the shim's namespace and is discarded.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("new network namespace: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("pin network namespace at %s: %w", path, err)
			return
		}
		// Loopback up, as runc leaves a new namespace.
		if lo, err := netlink.LinkByName("lo"); err == nil {
			netlink.LinkSetUp(lo)
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// RemoveNetns unpins and removes a namespace made by CreateNetns; the
// kernel frees it once nothing else holds it.
func RemoveNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unpin network namespace %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
