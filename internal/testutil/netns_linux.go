package testutil

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NewNetns creates a network namespace pinned by a bind mount at a file
// in a temporary directory, as `ip netns add` and CNI runtimes pin theirs,
// and removes it when the test ends. It needs root.
func NewNetns(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	path := filepath.Join(t.TempDir(), "netns")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		// The thread switches namespace and is discarded (never unlocked).
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		if err := unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("pin netns: %w", err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) })
	return path
}

// InNetns runs fn on a thread that joined the namespace at path; sockets
// fn opens live in that namespace. The thread is discarded afterwards.
func InNetns(t testing.TB, path string, fn func() error) error {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// VethPair joins two namespaces with a veth pair, like CNI's ptp plugin:
// podIf in pod (MAC podMAC, address podCIDR, default route via the peer),
// peerIf in peer with peerCIDR. Both ends are up.
func VethPair(t testing.TB, pod, podIf, podMAC, podCIDR, peer, peerIf, peerCIDR string) {
	t.Helper()
	peerNS, err := os.Open(peer)
	if err != nil {
		t.Fatal(err)
	}
	defer peerNS.Close()
	mac, err := net.ParseMAC(podMAC)
	if err != nil {
		t.Fatal(err)
	}
	err = InNetns(t, pod, func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: podIf, HardwareAddr: mac, MTU: 1400}, PeerName: peerIf}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		p, err := netlink.LinkByName(peerIf)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(p, int(peerNS.Fd())); err != nil {
			return fmt.Errorf("move %s: %w", peerIf, err)
		}
		l, err := netlink.LinkByName(podIf)
		if err != nil {
			return err
		}
		addr, err := netlink.ParseAddr(podCIDR)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
		for _, x := range []string{"lo", podIf} {
			if l, err := netlink.LinkByName(x); err == nil {
				if err := netlink.LinkSetUp(l); err != nil {
					return err
				}
			}
		}
		peerAddr, _ := netlink.ParseAddr(peerCIDR)
		return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: peerAddr.IP})
	})
	if err != nil {
		t.Fatalf("pod side of the veth pair: %v", err)
	}
	err = InNetns(t, peer, func() error {
		l, err := netlink.LinkByName(peerIf)
		if err != nil {
			return err
		}
		addr, err := netlink.ParseAddr(peerCIDR)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
		if err := netlink.LinkSetMTU(l, 1400); err != nil {
			return err
		}
		if lo, err := netlink.LinkByName("lo"); err == nil {
			netlink.LinkSetUp(lo)
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatalf("peer side of the veth pair: %v", err)
	}
}
