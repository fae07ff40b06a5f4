package network

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
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

// TestMain builds macvm-usernet, which NewUserNet starts, into a private
// directory.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "usernet-helper-")
	if err != nil {
		panic(err)
	}
	UserNetHelper = filepath.Join(dir, "macvm-usernet")
	out, err := exec.Command("go", "build", "-o", UserNetHelper, "../../cmd/macvm-usernet").CombinedOutput()
	if err != nil {
		os.RemoveAll(dir)
		panic(fmt.Sprintf("building macvm-usernet: %v\n%s", err, out))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func TestUserNetCloseReleasesPorts(t *testing.T) {
	u, err := NewUserNet([]PortForward{{HostAddr: "127.0.0.1:0", GuestPort: 80}})
	if err != nil {
		t.Fatal(err)
	}
	addr := u.Published()[0].String()
	if n := u.NIC(); n.File == nil || n.MAC.String() != GuestMAC {
		t.Errorf("NIC %+v: want the datagram end with MAC %s", n, GuestMAC)
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
	// The helper is gone once Close returns.
	if err := u.cmd.Process.Signal(syscall.Signal(0)); err == nil {
		t.Errorf("macvm-usernet %d still runs after Close", u.cmd.Process.Pid)
	}
}

// A port that cannot be published fails NewUserNet with ErrUnavailable and
// leaves no helper running.
func TestUserNetPublishFails(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	u, err := NewUserNet([]PortForward{{HostAddr: "127.0.0.1:0", GuestPort: 80}, {HostAddr: l.Addr().String(), GuestPort: 81}})
	if err == nil {
		u.Close()
		t.Fatalf("publishing %s, which is taken, succeeded", l.Addr())
	}
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), l.Addr().String()) {
		t.Errorf("error %v: want ErrUnavailable naming %s", err, l.Addr())
	}
}
