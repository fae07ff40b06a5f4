package network

import (
	"errors"
	"reflect"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParsePorts(t *testing.T) {
	got, err := ParsePorts(" 8080:80, 0.0.0.0:9000:90/tcp,,[::1]:1:2")
	if err == nil {
		t.Fatalf("a bracketed IPv6 host parsed: %v", got)
	}
	got, err = ParsePorts(" 8080:80, 0.0.0.0:9000:90/tcp,,0:22")
	if err != nil {
		t.Fatal(err)
	}
	want := []PortForward{
		{HostAddr: "127.0.0.1:8080", GuestPort: 80},
		{HostAddr: "0.0.0.0:9000", GuestPort: 90},
		{HostAddr: "127.0.0.1:0", GuestPort: 22},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
	for _, tc := range []struct {
		in   string
		want error
	}{
		{"80", errdefs.ErrInvalidArgument},
		{"a:80", errdefs.ErrInvalidArgument},
		{"8080:0", errdefs.ErrInvalidArgument},
		{"8080:70000", errdefs.ErrInvalidArgument},
		{"nohost:8080:80", errdefs.ErrInvalidArgument},
		{"53:53/udp", errdefs.ErrNotImplemented},
	} {
		if _, err := ParsePorts(tc.in); !errors.Is(err, tc.want) {
			t.Errorf("%q: got %v, want %v", tc.in, err, tc.want)
		}
	}
}

func TestUserNetCloseReleasesPorts(t *testing.T) {
	u, err := NewUserNet([]PortForward{{HostAddr: "127.0.0.1:0", GuestPort: 80}})
	if err != nil {
		t.Fatal(err)
	}
	addr := u.Published()[0].String()
	if n := u.NIC(); n.File == nil || n.MAC.String() != guestMACStr {
		t.Errorf("NIC %+v: want the datagram end with MAC %s", n, guestMACStr)
	}
	if err := u.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	u2, err := NewUserNet([]PortForward{{HostAddr: addr, GuestPort: 80}})
	if err != nil {
		t.Fatalf("the port %s is still taken after Close: %v", addr, err)
	}
	u2.Close()
	if err := u.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
