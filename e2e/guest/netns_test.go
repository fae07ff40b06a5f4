package guest_test

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/macvm/macvm/internal/testutil"
	"github.com/macvm/macvm/pkg/network"
)

// TestNetnsNetwork gives a VM the interface of a network namespace, the
// way a CNI-prepared pod namespace is taken over: a veth (eth0) whose peer
// is in a second namespace standing for the host side, a tap redirected to
// and from it with tc, the VM's NIC on the tap with eth0's MAC, addresses
// and routes. The container reaches the peer (the "gateway") and the peer
// reaches a server in the container at the pod's IP; closing leaves the
// namespace without tap or qdisc.
func TestNetnsNetwork(t *testing.T) {
	pod, peer := testutil.NewNetns(t), testutil.NewNetns(t)
	testutil.VethPair(t, pod, "eth0", "0a:58:0a:63:00:02", "10.99.0.2/24", peer, "peer0", "10.99.0.1/24")
	n, err := network.OpenNetns(pod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })

	cfg := vmConfig(t)
	cfg.NICs = n.NICs()
	v := bootVMWith(t, &cfg)
	if _, err := v.client.ConfigureNetwork(rpcCtx(t), n.GuestConfig()); err != nil {
		t.Fatalf("ConfigureNetwork: %v\nconsole:\n%s", err, v.m.ConsoleTail(2048))
	}
	noNetns := func(args ...string) *specs.Spec {
		return withoutNamespace(defaultSpec(args...), specs.NetworkNamespace)
	}
	out, errOut, status := v.run(t, "probe", noNetns("sh", "-c", "ip addr show eth0; ip route; ping -c 1 -W 20 10.99.0.1"))
	if status != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", status, out, errOut)
	}
	for _, want := range []string{"inet 10.99.0.2/24", "link/ether 0a:58:0a:63:00:02", "mtu 1400", "default via 10.99.0.1 dev eth0", "1 packets received"} {
		if !strings.Contains(out, want) {
			t.Errorf("container output lacks %q:\n%s", want, out)
		}
	}

	p := v.create(t, "server", noNetns("sh", "-c", "while true; do echo guest-says-hi | nc -l -p 8080; done"), false)
	v.start(t, p)
	var got string
	err = testutil.InNetns(t, peer, func() error {
		deadline := time.Now().Add(2 * time.Minute)
		for time.Now().Before(deadline) {
			c, err := net.DialTimeout("tcp", "10.99.0.2:8080", 10*time.Second)
			if err == nil {
				c.SetReadDeadline(time.Now().Add(30 * time.Second))
				got, _ = bufio.NewReader(c).ReadString('\n')
				c.Close()
				if got == "guest-says-hi\n" {
					return nil
				}
			}
			time.Sleep(500 * time.Millisecond)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if got != "guest-says-hi\n" {
		t.Errorf("10.99.0.2:8080 from the peer namespace: read %q, want guest-says-hi", got)
	}
}
