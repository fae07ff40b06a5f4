package network

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/internal/tap"
	"github.com/macvm/macvm/internal/testutil"
	"github.com/macvm/macvm/pkg/vm"
)

// standInTap makes what the pool daemon keeps for a pooled VM's tap NIC:
// a network namespace of its own holding tap tmpl0, opened as QEMU sets
// it up (virtio-net headers of 12 bytes, offloads on). It returns the
// namespace and the tap's queue (qemu's fd).
func standInTap(t *testing.T) (ns, q *os.File) {
	t.Helper()
	type res struct {
		ns, q *os.File
		err   error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread leaves our namespace
		var r res
		defer func() { ch <- r }()
		if r.err = unix.Unshare(unix.CLONE_NEWNET); r.err != nil {
			return
		}
		if r.ns, r.err = os.Open("/proc/thread-self/ns/net"); r.err != nil {
			return
		}
		if r.q, r.err = tap.Open("tmpl0"); r.err != nil {
			return
		}
		if r.err = unix.IoctlSetPointerInt(int(r.q.Fd()), unix.TUNSETVNETHDRSZ, 12); r.err != nil {
			return
		}
		r.err = unix.IoctlSetInt(int(r.q.Fd()), unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6)
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("stand-in tap: %v", r.err)
	}
	t.Cleanup(func() { r.q.Close(); r.ns.Close() })
	return r.ns, r.q
}

// tunState is what QEMU relies on in its tap fd: the flags, the
// virtio-net header size, and the device's TSO offload (ethtool).
func tunState(t *testing.T, q *os.File, ns, name string) string {
	t.Helper()
	ifr, err := unix.NewIfreq("")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(int(q.Fd()), unix.TUNGETIFF, ifr); err != nil {
		t.Fatalf("TUNGETIFF: %v", err)
	}
	var hdr int32
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, q.Fd(), unix.TUNGETVNETHDRSZ, uintptr(unsafe.Pointer(&hdr))); e != 0 {
		t.Fatalf("TUNGETVNETHDRSZ: %v", e)
	}
	var tso uint32
	err = testutil.InNetns(t, ns, func() error {
		s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(s)
		ev := struct{ cmd, data uint32 }{cmd: 0x1e} // ETHTOOL_GTSO
		// struct ifreq: the name, then a union holding a pointer to the
		// ethtool request.
		var ifr struct {
			name [unix.IFNAMSIZ]byte
			data unsafe.Pointer
			_    [16]byte
		}
		copy(ifr.name[:], name)
		ifr.data = unsafe.Pointer(&ev)
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(s), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); e != 0 {
			return fmt.Errorf("ETHTOOL_GTSO %s: %w", name, e)
		}
		tso = ev.data
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("flags=%#x vnet_hdr=%d tso=%d", ifr.Uint16(), hdr, tso)
}

// redirectTarget is the ifindex l's ingress filter redirects to (0: none).
func redirectTarget(t *testing.T, ns, link string) int {
	t.Helper()
	target := 0
	err := testutil.InNetns(t, ns, func() error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		fs, err := netlink.FilterList(l, netlink.MakeHandle(0xffff, 0))
		if err != nil {
			return err
		}
		for _, f := range fs {
			if u, ok := f.(*netlink.U32); ok {
				for _, a := range u.Actions {
					if m, ok := a.(*netlink.MirredAction); ok {
						target = m.Ifindex
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return target
}

func linkIn(t *testing.T, ns, name string) netlink.Link {
	t.Helper()
	var l netlink.Link
	err := testutil.InNetns(t, ns, func() error {
		var err error
		l, err = netlink.LinkByName(name)
		return err
	})
	if err != nil {
		t.Fatalf("%s in %s: %v", name, ns, err)
	}
	return l
}

// arpExchange writes an ARP request for 10.99.0.1 from eth0's address
// into qemu's end of the tap (as the guest would send it) and waits for
// the peer's reply to come back out of it: frames flow both ways through
// the tc redirects.
func arpExchange(t *testing.T, q *os.File) error {
	t.Helper()
	mac, _ := net.ParseMAC("0a:58:0a:63:00:02")
	var f bytes.Buffer
	f.Write(make([]byte, 12)) // virtio-net header: no offload
	f.Write([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Write(mac)
	binary.Write(&f, binary.BigEndian, uint16(unix.ETH_P_ARP))
	binary.Write(&f, binary.BigEndian, []uint16{1, unix.ETH_P_IP})
	f.Write([]byte{6, 4, 0, 1})
	f.Write(mac)
	f.Write(net.IPv4(10, 99, 0, 2).To4())
	f.Write(make([]byte, 6))
	f.Write(net.IPv4(10, 99, 0, 1).To4())
	if _, err := unix.Write(int(q.Fd()), f.Bytes()); err != nil {
		return fmt.Errorf("write to the tap: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		fds := []unix.PollFd{{Fd: int32(q.Fd()), Events: unix.POLLIN}}
		if n, err := unix.Poll(fds, 1000); err != nil || n == 0 {
			continue
		}
		n, err := unix.Read(int(q.Fd()), buf)
		if err != nil {
			return fmt.Errorf("read from the tap: %w", err)
		}
		fr := buf[12:n]
		if len(fr) >= 42 && binary.BigEndian.Uint16(fr[12:]) == unix.ETH_P_ARP && binary.BigEndian.Uint16(fr[20:]) == 2 &&
			bytes.Equal(fr[0:6], mac) {
			return nil
		}
	}
	return fmt.Errorf("no ARP reply came out of the tap")
}

// TestAdoptTap: a pooled VM's stand-in tap is moved from its namespace
// into the pod's and carries the CNI interface's traffic (an ARP request
// written into qemu's fd gets its reply), its fd keeping the flags,
// virtio-net header size and offloads QEMU set; reclaim gives the
// interface back to the shim's own tap, and Close leaves the namespace
// as CNI made it.
func TestAdoptTap(t *testing.T) {
	pod, peer := testutil.NewNetns(t), testutil.NewNetns(t)
	testutil.VethPair(t, pod, "eth0", "0a:58:0a:63:00:02", "10.99.0.2/24", peer, "peer0", "10.99.0.1/24")
	n, err := OpenNetns(pod)
	if err != nil {
		t.Fatalf("OpenNetns: %v", err)
	}
	defer n.Close()
	nics := n.NICs()
	if nics[0].Adopt == nil || nics[0].Reclaim == nil {
		t.Fatal("the tap NIC cannot adopt")
	}
	ownTap := n.ifs[0].tap
	ownIndex := linkIn(t, pod, ownTap).Attrs().Index
	eth0 := linkIn(t, pod, "eth0").Attrs()

	ns, q := standInTap(t)
	before := tunState(t, q, fdPath(ns), "tmpl0")
	if !strings.Contains(before, "vnet_hdr=12") || strings.Contains(before, "tso=0") {
		t.Fatalf("stand-in tap before the move: %s; want 12-byte headers and TSO on", before)
	}
	if err := nics[0].Adopt(vm.StandIn{Kind: vm.NICTap, Netns: ns, Name: "tmpl0"}); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	moved := fmt.Sprintf("macvmp%d", eth0.Index)
	l := linkIn(t, pod, moved)
	after := tunState(t, q, pod, moved)
	t.Logf("tap before the move: %s; after: %s", before, after)
	if after != before {
		t.Errorf("tap after the move: %s, before: %s", after, before)
	}
	if l.Attrs().MTU != eth0.MTU || l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("moved tap: MTU %d, flags %v; want eth0's MTU %d and up", l.Attrs().MTU, l.Attrs().Flags, eth0.MTU)
	}
	if got := redirectTarget(t, pod, "eth0"); got != l.Attrs().Index {
		t.Errorf("eth0 redirects to ifindex %d, want the moved tap's %d", got, l.Attrs().Index)
	}
	if got := redirectTarget(t, pod, moved); got != eth0.Index {
		t.Errorf("the moved tap redirects to ifindex %d, want eth0's %d", got, eth0.Index)
	}
	if err := arpExchange(t, q); err != nil {
		t.Errorf("traffic through the adopted tap: %v", err)
	}
	if err := nics[0].Adopt(vm.StandIn{Kind: vm.NICTap, Netns: ns, Name: "tmpl0"}); err == nil {
		t.Error("a second Adopt succeeded")
	}

	if err := nics[0].Reclaim(); err != nil {
		t.Fatalf("Reclaim: %v", err)
	}
	if got := redirectTarget(t, pod, "eth0"); got != ownIndex {
		t.Errorf("after Reclaim eth0 redirects to ifindex %d, want the shim's tap's %d", got, ownIndex)
	}
	taps, _ := tcState(t, pod)
	if len(taps) != 1 || taps[0] != ownTap {
		t.Errorf("after Reclaim: taps %v, want only %s", taps, ownTap)
	}

	// Adopted again (a second stand-in), then closed: nothing left.
	ns2, _ := standInTap(t)
	if err := nics[0].Adopt(vm.StandIn{Kind: vm.NICTap, Netns: ns2, Name: "tmpl0"}); err != nil {
		t.Fatalf("Adopt after Reclaim: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	taps, ingress := tcState(t, pod)
	if len(taps) != 0 || len(ingress) != 0 {
		t.Errorf("after Close: taps %v, ingress qdiscs on %v; want the namespace as CNI left it", taps, ingress)
	}
}

// TestAdoptTapFails: a stand-in that is not there fails the adoption and
// leaves the shim's own tap carrying the interface.
func TestAdoptTapFails(t *testing.T) {
	pod, peer := testutil.NewNetns(t), testutil.NewNetns(t)
	testutil.VethPair(t, pod, "eth0", "0a:58:0a:63:00:02", "10.99.0.2/24", peer, "peer0", "10.99.0.1/24")
	n, err := OpenNetns(pod)
	if err != nil {
		t.Fatalf("OpenNetns: %v", err)
	}
	defer n.Close()
	own := linkIn(t, pod, n.ifs[0].tap).Attrs().Index
	ns, _ := standInTap(t)
	nic := n.NICs()[0]
	for _, s := range []vm.StandIn{
		{Kind: vm.NICTap, Netns: ns, Name: "nosuch0"},
		{Kind: vm.NICDatagram, Netns: ns, Name: "tmpl0"},
		{Kind: vm.NICTap, Name: "tmpl0"},
	} {
		if err := nic.Adopt(s); err == nil {
			t.Errorf("Adopt(%+v) succeeded", s)
		}
	}
	if got := redirectTarget(t, pod, "eth0"); got != own {
		t.Errorf("eth0 redirects to ifindex %d, want the shim's tap's %d", got, own)
	}
	if err := nic.Reclaim(); err != nil {
		t.Errorf("Reclaim with nothing adopted: %v", err)
	}
}

func fdPath(f *os.File) string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), f.Fd()) }
