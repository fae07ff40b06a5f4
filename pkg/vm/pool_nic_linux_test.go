package vm

import (
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/internal/testutil"
)

// TestPoolStandInsHandOver: a pooled VM's stand-ins (a tap in a private
// namespace, a datagram socket pair) travel with a hand-over message and
// arrive as StandIns: the tap's namespace holding it under the name
// given, a datagram socket connected to the daemon's end.
func TestPoolStandInsHandOver(t *testing.T) {
	s, err := newStandIns([]NIC{{Kind: NICTap}, {Kind: NICDatagram}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	if s.nics[0].MAC.String() != TemplateMAC(0).String() || s.nics[1].MAC.String() != TemplateMAC(1).String() {
		t.Errorf("stand-in MACs %v %v, want the template's", s.nics[0].MAC, s.nics[1].MAC)
	}
	meta, files := s.handOver()
	a, b := unixPair(t)
	pipes := make([]*os.File, poolFDCount)
	for i := range pipes {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		defer w.Close()
		pipes[i] = w
	}
	rep := poolReply{Key: "k", Pid: 1, Dir: "/d", NICs: meta}
	if err := writePoolMessage(a, &rep, append(pipes, files...)...); err != nil {
		t.Fatal(err)
	}
	var got poolReply
	recv, err := readPoolMessage(b, &got, poolFDCount+maxPoolNICs, time.Now().Add(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer closeFiles(recv)
	if len(recv) != poolFDCount+2 || len(got.NICs) != 2 {
		t.Fatalf("received %d descriptors, NICs %+v", len(recv), got.NICs)
	}
	adopt := func(StandIn) error { return nil }
	reclaim := func() error { return nil }
	cfg := Config{NICs: []NIC{{Kind: NICTap, Adopt: adopt, Reclaim: reclaim}, {Kind: NICDatagram, Adopt: adopt, Reclaim: reclaim}}}
	sis, err := pooledStandIns(cfg, got.NICs, recv[poolFDCount:])
	if err != nil {
		t.Fatal(err)
	}
	if sis[0].Kind != NICTap || sis[0].Name != standInTapName(0) || sis[0].Netns == nil || sis[1].Kind != NICDatagram || sis[1].File == nil {
		t.Fatalf("stand-ins %+v", sis)
	}
	err = testutil.InNetns(t, fmt.Sprintf("/proc/self/fd/%d", sis[0].Netns.Fd()), func() error {
		l, err := netlink.LinkByName(sis[0].Name)
		if err != nil {
			return err
		}
		if l.Type() != "tuntap" || l.Attrs().Flags&net.FlagUp != 0 {
			return fmt.Errorf("%s: type %s, flags %v; want a tap, down", sis[0].Name, l.Type(), l.Attrs().Flags)
		}
		return nil
	})
	if err != nil {
		t.Errorf("the tap in the namespace handed over: %v", err)
	}
	if typ, err := unix.GetsockoptInt(int(sis[1].File.Fd()), unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_DGRAM {
		t.Errorf("datagram stand-in: type %d, %v", typ, err)
	}
	if rcv, _ := unix.GetsockoptInt(int(sis[1].File.Fd()), unix.SOL_SOCKET, unix.SO_RCVBUF); rcv < 4<<20 {
		t.Errorf("datagram stand-in: receive buffer %d, want the user-space network's (4 MiB)", rcv)
	}
}

// TestPooledStandInsMismatch: a hand-over whose NICs differ from the
// VM's wanted ones in number or kind, or NICs that cannot adopt, fail the
// take (the caller starts a template clone).
func TestPooledStandInsMismatch(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	adopt := func(StandIn) error { return nil }
	reclaim := func() error { return nil }
	tap := NIC{Kind: NICTap, Adopt: adopt, Reclaim: reclaim}
	for _, tc := range []struct {
		name  string
		nics  []NIC
		meta  []poolNIC
		files []*os.File
		is    func(error) bool
	}{
		{"fewer", []NIC{tap, tap}, []poolNIC{{Kind: NICTap, Name: "tmpl0"}}, []*os.File{f}, errdefs.IsDataLoss},
		{"no descriptor", []NIC{tap}, []poolNIC{{Kind: NICTap, Name: "tmpl0"}}, nil, errdefs.IsDataLoss},
		{"kind", []NIC{tap}, []poolNIC{{Kind: NICDatagram}}, []*os.File{f}, errdefs.IsDataLoss},
		{"no name", []NIC{tap}, []poolNIC{{Kind: NICTap}}, []*os.File{f}, errdefs.IsDataLoss},
		{"cannot adopt", []NIC{{Kind: NICTap}}, []poolNIC{{Kind: NICTap, Name: "tmpl0"}}, []*os.File{f}, errdefs.IsNotImplemented},
	} {
		if _, err := pooledStandIns(Config{NICs: tc.nics}, tc.meta, tc.files); !tc.is(err) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestPoolKeyOfNICs: a take's NICs carry no files, yet key as the
// template's do: by kind and order, whatever their MACs; disks by
// number and read-only flag, whatever their images.
func TestPoolKeyOfNICs(t *testing.T) {
	cfg := fakeConfig(t)
	with := func(nics ...NIC) Config { c := cfg; c.NICs = nics; return c }
	mac, _ := net.ParseMAC("0a:58:0a:63:00:02")
	tapKey, err := poolKeyOf(with(NIC{Kind: NICTap}))
	if err != nil {
		t.Fatal(err)
	}
	if k, err := poolKeyOf(with(NIC{Kind: NICTap, MAC: mac})); err != nil || k != tapKey {
		t.Errorf("tap with a MAC: key %s, %v; want %s", k, err, tapKey)
	}
	dgKey, err := poolKeyOf(with(NIC{Kind: NICDatagram}))
	if err != nil || dgKey == tapKey {
		t.Errorf("datagram key %s, %v; want one of its own", dgKey, err)
	}
	noneKey, err := poolKeyOf(cfg)
	if err != nil || noneKey == tapKey {
		t.Errorf("key without NICs %s, %v", noneKey, err)
	}
	// The key the shim computes (with its NIC files) is the same.
	f, _ := os.Open(os.DevNull)
	defer f.Close()
	q, err := NewQEMU(with(NIC{Kind: NICTap, File: f, MAC: mac}))
	if err != nil {
		t.Fatal(err)
	}
	in, err := q.templateInputs()
	if err != nil {
		t.Fatal(err)
	}
	if k, _, err := in.key(); err != nil || k != tapKey {
		t.Errorf("the shim's key %s, %v; the daemon's %s", k, err, tapKey)
	}
	d1, d2 := cfg, cfg
	d1.Disks = []Disk{{Path: "/x"}, {Path: "/y", ReadOnly: true}}
	d2.Disks = []Disk{{Path: "/z"}, {Path: "/w", ReadOnly: true}}
	k1, err1 := poolKeyOf(d1)
	k2, err2 := poolKeyOf(d2)
	if err1 != nil || err2 != nil || k1 != k2 || k1 == noneKey {
		t.Errorf("keys of VMs with disks: %s %v, %s %v; want one, not the disk-less %s", k1, err1, k2, err2, noneKey)
	}
}

// TestPoolable: only VMs whose NICs can all adopt a pooled VM's
// stand-ins are asked from the pool (disks are swapped in).
func TestPoolable(t *testing.T) {
	adopt := func(StandIn) error { return nil }
	reclaim := func() error { return nil }
	ok := NIC{Kind: NICTap, Adopt: adopt, Reclaim: reclaim}
	for _, tc := range []struct {
		cfg  Config
		want bool
	}{
		{Config{}, true},
		{Config{NICs: []NIC{ok, {Kind: NICDatagram, Adopt: adopt, Reclaim: reclaim}}}, true},
		{Config{NICs: []NIC{ok, {Kind: NICDatagram}}}, false},
		{Config{NICs: []NIC{{Kind: NICTap, Adopt: adopt}}}, false},
		{Config{Disks: []Disk{{Path: "/x"}}}, true},
	} {
		if got := poolable(tc.cfg); got != tc.want {
			t.Errorf("poolable(%d NICs, %d disks) = %v, want %v", len(tc.cfg.NICs), len(tc.cfg.Disks), got, tc.want)
		}
	}
}
