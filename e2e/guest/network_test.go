package guest_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/macvm/macvm/pkg/network"
	"github.com/macvm/macvm/pkg/vm"
)

// TestUserNetwork boots a VM whose only NIC is a datagram socket to the
// shim's user-space stack (gvisor-tap-vsock), configures it through the
// agent's ConfigureNetwork, and checks from a container without a network
// namespace of its own: the address and route, a TCP server on the host's
// loopback reached through the stack's NAT, a name served by the stack's
// DNS, and a port published from the host into the guest. A container that
// asks for a new network namespace sees loopback only.
func TestUserNetwork(t *testing.T) {
	// A web server on the host's loopback, which the guest reaches through the NAT stack.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello-from-host\n") }))
	defer srv.Close()
	hostPort := srv.Listener.Addr().(*net.TCPAddr).Port

	// The shim finds macvm-usernet beside itself; this test binary has it built.
	network.UserNetHelper = filepath.Join(t.TempDir(), "macvm-usernet")
	if b, err := exec.Command("go", "build", "-o", network.UserNetHelper, "../../cmd/macvm-usernet").CombinedOutput(); err != nil {
		t.Fatalf("build macvm-usernet: %v\n%s", err, b)
	}
	u, err := network.NewUserNet([]network.PortForward{{HostAddr: "127.0.0.1:0", GuestPort: 8080}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	cfg := vmConfig(t)
	cfg.NICs = []vm.NIC{u.NIC()}
	v := bootVMWith(t, &cfg)
	if _, err := v.client.ConfigureNetwork(rpcCtx(t), u.GuestConfig()); err != nil {
		t.Fatalf("ConfigureNetwork: %v\nconsole:\n%s", err, v.m.ConsoleTail(2048))
	}

	script := "ip addr show eth0; ip route; " +
		"wget -q -O - http://" + network.HostIP + ":" + strconv.Itoa(hostPort) + "/; " +
		"nslookup host.macvm.internal " + network.GatewayIP
	out, errOut, status := v.run(t, "net", withoutNamespace(defaultSpec("sh", "-c", script), specs.NetworkNamespace))
	if status != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", status, out, errOut)
	}
	for _, want := range []string{
		"inet " + network.GuestIP + "/24",
		"link/ether 5a:94:ef:e4:0c:ee",
		"default via " + network.GatewayIP + " dev eth0",
		"hello-from-host",
		"Address: " + network.HostIP,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("container output lacks %q:\n%s\nstderr:\n%s", want, out, errOut)
		}
	}

	// A container with a network namespace of its own has loopback only.
	out, _, _ = v.run(t, "isolated", defaultSpec("ls", "/sys/class/net"))
	if strings.TrimSpace(out) != "lo" {
		t.Errorf("a new network namespace shows %q, want lo only", out)
	}

	// A port published on the host reaches a server in the guest.
	p := v.create(t, "server", withoutNamespace(defaultSpec("sh", "-c",
		"while true; do echo guest-says-hi | nc -l -p 8080; done"), specs.NetworkNamespace), false)
	v.start(t, p)
	addr := u.Published()[0].String()
	deadline := time.Now().Add(2 * time.Minute)
	var got string
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err == nil {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, _ = bufio.NewReader(c).ReadString('\n')
			c.Close()
			if got == "guest-says-hi\n" {
				break
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	if got != "guest-says-hi\n" {
		t.Errorf("published port %s -> guest 8080: read %q, want guest-says-hi", addr, got)
	}
}
