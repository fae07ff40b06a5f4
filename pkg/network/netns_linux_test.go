package network

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"

	"github.com/macvm/macvm/internal/testutil"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// tcState lists, inside the namespace, the taps and the links that have
// an ingress qdisc.
func tcState(t *testing.T, ns string) (taps, ingress []string) {
	t.Helper()
	err := testutil.InNetns(t, ns, func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if l.Type() == "tuntap" {
				taps = append(taps, l.Attrs().Name)
			}
			qs, err := netlink.QdiscList(l)
			if err != nil {
				return err
			}
			for _, q := range qs {
				if q.Type() == "ingress" {
					ingress = append(ingress, l.Attrs().Name)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return taps, ingress
}

func TestOpenNetnsTakesOverAndRestores(t *testing.T) {
	pod, peer := testutil.NewNetns(t), testutil.NewNetns(t)
	testutil.VethPair(t, pod, "eth0", "0a:58:0a:63:00:02", "10.99.0.2/24", peer, "peer0", "10.99.0.1/24")

	n, err := OpenNetns(pod)
	if err != nil {
		t.Fatalf("OpenNetns: %v", err)
	}
	want := &agent.ConfigureNetworkRequest{
		Interfaces: []*agent.NetworkInterface{{
			DeviceMac: "0a:58:0a:63:00:02", Name: "eth0", Mac: "0a:58:0a:63:00:02", Mtu: 1400, Addresses: []string{"10.99.0.2/24"},
		}},
		Routes: []*agent.Route{
			{Destination: "10.99.0.0/24", Device: "eth0", Source: "10.99.0.2"},
			{Gateway: "10.99.0.1", Device: "eth0"},
		},
	}
	if got := n.GuestConfig(); !reflect.DeepEqual(got.Interfaces, want.Interfaces) || !reflect.DeepEqual(got.Routes, want.Routes) {
		t.Errorf("guest config:\n got %v\nwant %v", got, want)
	}
	nics := n.NICs()
	if len(nics) != 1 || nics[0].Kind != vm.NICTap || nics[0].File == nil || nics[0].MAC.String() != "0a:58:0a:63:00:02" {
		t.Errorf("NICs %+v, want one tap with eth0's MAC", nics)
	}
	taps, ingress := tcState(t, pod)
	if len(taps) != 1 || len(ingress) != 2 {
		t.Errorf("while open: taps %v, ingress qdiscs on %v; want one tap, and ingress on it and eth0", taps, ingress)
	}
	if err := n.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	taps, ingress = tcState(t, pod)
	if len(taps) != 0 || len(ingress) != 0 {
		t.Errorf("after Close: taps %v, ingress qdiscs on %v; want the namespace as CNI left it", taps, ingress)
	}
}

func TestOpenNetnsRejects(t *testing.T) {
	empty := testutil.NewNetns(t)
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	for _, tc := range []struct {
		name, path string
		want       error
	}{
		{"missing", "/proc/nonexistent/ns/net", errdefs.ErrNotFound},
		{"relative", "ns/net", errdefs.ErrInvalidArgument},
		{"not a namespace", file, errdefs.ErrInvalidArgument},
		{"only loopback", empty, errdefs.ErrNotFound},
	} {
		n, err := OpenNetns(tc.path)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
		if n != nil {
			n.Close()
		}
	}
}
