package network

import (
	"context"
	"errors"
	"net"
	"os"
	"runtime"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// inNewNetns moves the test's goroutine, locked to its thread, into a new
// network namespace with two NICs (a veth pair) standing in for virtio-net. The
// thread is never unlocked, so Go discards it when the test ends.
func inNewNetns(t *testing.T) *netlink.Handle {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatalf("unshare netns: %v", err)
	}
	h, err := netlink.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	// A veth pair: the host may lack the dummy module; veth is what CNI uses.
	if err := h.LinkAdd(&netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: "nic0", HardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 1}},
		PeerName:         "nic1",
		PeerHardwareAddr: net.HardwareAddr{2, 0, 0, 0, 0, 2},
	}); err != nil {
		t.Fatalf("add veth pair: %v", err)
	}
	return h
}

// firstNIC is the MAC of the non-loopback link with the lowest ifindex
// (veth may give the peer the lower one).
func firstNIC(t *testing.T, h *netlink.Handle) string {
	t.Helper()
	a, err := h.LinkByName("nic0")
	if err != nil {
		t.Fatal(err)
	}
	b, err := h.LinkByName("nic1")
	if err != nil {
		t.Fatal(err)
	}
	if a.Attrs().Index < b.Attrs().Index {
		return a.Attrs().HardwareAddr.String()
	}
	return b.Attrs().HardwareAddr.String()
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	hw, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return hw
}

func TestApplyConfiguresInterfaceRoutesNeighbours(t *testing.T) {
	h := inNewNetns(t)
	c, err := New(nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Interfaces: []Interface{{
			DeviceMAC: mustMAC(t, "02:00:00:00:00:02"), Name: "eth0", MAC: mustMAC(t, "0a:58:0a:04:00:05"),
			MTU: 1400, Addresses: []string{"10.4.0.5/24", "fd00:4::5/64"},
		}},
		Routes: []Route{
			{Destination: "10.4.0.0/24", Device: "eth0"},
			{Gateway: "10.4.0.1", Device: "eth0"},
			{Destination: "192.168.50.0/24", Gateway: "10.4.0.1", Device: "eth0", Metric: 20},
		},
		Neighbours: []Neighbour{{IP: "10.4.0.1", MAC: mustMAC(t, "0a:58:0a:04:00:01"), Device: "eth0"}},
	}
	if err := c.Apply(context.Background(), cfg); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	l, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatalf("eth0 after Apply: %v", err)
	}
	a := l.Attrs()
	if got, want := a.HardwareAddr.String(), "0a:58:0a:04:00:05"; got != want {
		t.Errorf("MAC = %s, want %s", got, want)
	}
	if a.MTU != 1400 {
		t.Errorf("MTU = %d, want 1400", a.MTU)
	}
	if a.Flags&net.FlagUp == 0 {
		t.Errorf("eth0 is not up")
	}
	if _, err := h.LinkByName("nic0"); err != nil {
		t.Errorf("nic0 (not asked for) should be untouched: %v", err)
	}
	addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, ad := range addrs {
		have[ad.IPNet.String()] = true
	}
	for _, want := range []string{"10.4.0.5/24", "fd00:4::5/64"} {
		if !have[want] {
			t.Errorf("address %s missing; have %v", want, have)
		}
	}
	routes, err := h.RouteList(l, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var gotDefault, gotExtra bool
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.Equal(net.ParseIP("10.4.0.1")) {
			gotDefault = true
		}
		if r.Dst != nil && r.Dst.String() == "192.168.50.0/24" && r.Priority == 20 {
			gotExtra = true
		}
	}
	if !gotDefault || !gotExtra {
		t.Errorf("routes %v: default via 10.4.0.1 %v, 192.168.50.0/24 metric 20 %v", routes, gotDefault, gotExtra)
	}
	neighs, err := h.NeighList(a.Index, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var gotNeigh bool
	for _, n := range neighs {
		if n.IP.Equal(net.ParseIP("10.4.0.1")) && n.HardwareAddr.String() == "0a:58:0a:04:00:01" && n.State == netlink.NUD_PERMANENT {
			gotNeigh = true
		}
	}
	if !gotNeigh {
		t.Errorf("permanent neighbour 10.4.0.1 missing: %v", neighs)
	}
}

func TestApplyByIndex(t *testing.T) {
	h := inNewNetns(t)
	c, err := New(nil)
	if err != nil {
		t.Fatal(err)
	}
	want := firstNIC(t, h)
	if err := c.Apply(context.Background(), Config{Interfaces: []Interface{{Index: 0, Name: "eth0"}}}); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	l, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Attrs().HardwareAddr.String(); got != want {
		t.Errorf("index 0 renamed the NIC with MAC %s, want the first one (%s)", got, want)
	}
}

func TestApplyRejectsBadInput(t *testing.T) {
	h := inNewNetns(t)
	first := firstNIC(t, h)
	c, err := New(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want error
	}{
		{"unknown MAC", Config{Interfaces: []Interface{{DeviceMAC: mustMAC(t, "02:aa:00:00:00:09")}}}, errdefs.ErrNotFound},
		{"index out of range", Config{Interfaces: []Interface{{Index: 5}}}, errdefs.ErrNotFound},
		{"same NIC twice", Config{Interfaces: []Interface{{Index: 0}, {DeviceMAC: mustMAC(t, first)}}}, errdefs.ErrInvalidArgument},
		{"bad address", Config{Interfaces: []Interface{{Index: 1, Addresses: []string{"10.0.0.300/24"}}}}, errdefs.ErrInvalidArgument},
		{"bad gateway", Config{Routes: []Route{{Gateway: "nope"}}}, errdefs.ErrInvalidArgument},
		{"route on unknown device", Config{Routes: []Route{{Destination: "10.0.0.0/8", Device: "eth9"}}}, errdefs.ErrNotFound},
	} {
		err := c.Apply(context.Background(), tc.cfg)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
}
