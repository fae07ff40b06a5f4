package vm

import (
	"errors"
	"net"
	"reflect"
	"testing"

	"github.com/containerd/errdefs"
)

func TestQEMUArgsNICs(t *testing.T) {
	mac, _ := net.ParseMAC("0a:58:0a:04:00:05")
	cfg := Config{ID: "c1", Kernel: "/k/vmlinux", NICs: []NIC{{Kind: NICTap, MAC: mac}, {Kind: NICDatagram}}}
	o := baseOptions()
	o.NICFDs = []int{5, 6}
	args, err := qemuArgs(cfg, o)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := argValues(args, "-netdev"), []string{
		"tap,id=net0,fd=5",
		"dgram,id=net1,local.type=fd,local.str=6",
	}; !reflect.DeepEqual(got, want) {
		t.Errorf("-netdev: got %q, want %q", got, want)
	}
	var nics []string
	for _, d := range argValues(args, "-device") {
		if len(d) > 17 && d[:17] == "virtio-net-device" {
			nics = append(nics, d)
		}
	}
	if want := []string{"virtio-net-device,netdev=net0,mac=0a:58:0a:04:00:05", "virtio-net-device,netdev=net1"}; !reflect.DeepEqual(nics, want) {
		t.Errorf("NIC devices: got %q, want %q", nics, want)
	}
}

func TestQEMUArgsNoNICs(t *testing.T) {
	args, err := qemuArgs(Config{ID: "c1", Kernel: "/k/vmlinux"}, baseOptions())
	if err != nil {
		t.Fatal(err)
	}
	if hasFlag(args, "-netdev") {
		t.Errorf("a VM without NICs got a -netdev: %q", args)
	}
}

func TestQEMUArgsNICRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		nics []NIC
		fds  []int
	}{
		{"fd count", []NIC{{Kind: NICTap}}, nil},
		{"unknown kind", []NIC{{Kind: NICKind(9)}}, []int{5}},
		{"short MAC", []NIC{{Kind: NICTap, MAC: net.HardwareAddr{1, 2}}}, []int{5}},
	} {
		o := baseOptions()
		o.NICFDs = tc.fds
		_, err := qemuArgs(Config{ID: "c1", Kernel: "/k/vmlinux", NICs: tc.nics}, o)
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: got %v, want invalid argument", tc.name, err)
		}
	}
}

func TestNewQEMURejectsNICWithoutFile(t *testing.T) {
	_, err := NewQEMU(Config{ID: "c1", StateDir: t.TempDir(), Kernel: "", NICs: []NIC{{Kind: NICDatagram}}})
	if !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("got %v, want invalid argument", err)
	}
}
