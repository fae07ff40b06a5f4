package containerd_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
	"github.com/macvm/macvm/pkg/network"
)

// TestNetworkDefaultLoopbackOnly: `ctr run` gives a new, empty network
// namespace; under macvm the VM then has no NIC, so the container sees lo
// only, as under runc.
func TestNetworkDefaultLoopbackOnly(t *testing.T) {
	forEachRuntime(t, false, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt)
		res := run(t, d, rt, nil, nil, "netdefault", "ls", "/sys/class/net")
		if res.ExitCode != 0 || strings.TrimSpace(string(res.Stdout)) != "lo" {
			t.Errorf("ls /sys/class/net: %v; want lo only", res)
		}
	})
}

// TestNetworkHost: `ctr run --net-host` (no network namespace in the spec)
// puts the VM on the shim's user-space NAT stack: the container reaches a
// TCP server on the host's loopback at network.HostIP and resolves a name
// served by the stack's DNS.
func TestNetworkHost(t *testing.T) {
	forEachRuntime(t, true, func(t *testing.T, rt harness.Runtime) {
		// A web server on the host's loopback, which the guest reaches through the NAT stack.
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello-from-host\n") }))
		defer srv.Close()
		port := srv.Listener.Addr().(*net.TCPAddr).Port
		d := daemon(t, rt)
		script := fmt.Sprintf("wget -q -O - http://%s:%d/ && nslookup host.macvm.internal %s", network.HostIP, port, network.GatewayIP)
		res := run(t, d, rt, nil, []string{"--net-host"}, "nethost", "sh", "-c", script)
		if res.ExitCode != 0 || !strings.Contains(string(res.Stdout), "hello-from-host") || !strings.Contains(string(res.Stdout), "Address: "+network.HostIP) {
			t.Errorf("--net-host: %v; want the host server's reply and host.macvm.internal = %s", res, network.HostIP)
		}
	})
}

// cniPlugin runs one CNI plugin binary the way a CNI runtime does.
func cniPlugin(t *testing.T, command, netns, conf string) []byte {
	t.Helper()
	bin := filepath.Join(suite.Paths.BinDir, "cni")
	cmd := exec.Command(filepath.Join(bin, "bridge"))
	cmd.Env = append(os.Environ(), "CNI_COMMAND="+command, "CNI_CONTAINERID=e2e-"+filepath.Base(filepath.Dir(netns)),
		"CNI_NETNS="+netns, "CNI_IFNAME=eth0", "CNI_PATH="+bin)
	cmd.Stdin = strings.NewReader(conf)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := harness.Output(cmd)
	if err != nil {
		t.Fatalf("CNI bridge %s: %v\n%s%s\n(build the plugins with `make cni`)", command, err, out, stderr.String())
	}
	return out
}

// TestNetworkCNIBridge: a network namespace prepared by CNI's bridge
// plugin, given to the container by path: the container has the address
// CNI gave, is reachable from the host at it, and reaches the bridge's
// gateway. Under macvm the namespace has no tap or qdisc left afterwards.
func TestNetworkCNIBridge(t *testing.T) {
	forEachRuntime(t, false, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt)
		dir := t.TempDir()
		netns := filepath.Join(dir, "netns")
		if err := network.CreateNetns(netns); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { network.RemoveNetns(netns) })
		n := os.Getpid()%200 + time.Now().Nanosecond()%50
		bridge := fmt.Sprintf("mvmnet%d", n)
		conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "e2e-net", "type": "bridge", "bridge": %q, "isGateway": true,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.%d.0/24"}]], "dataDir": %q}}`, bridge, n, filepath.Join(dir, "ipam"))
		var result struct {
			IPs []struct {
				Address string `json:"address"`
				Gateway string `json:"gateway"`
			} `json:"ips"`
		}
		if err := json.Unmarshal(cniPlugin(t, "ADD", netns, conf), &result); err != nil || len(result.IPs) == 0 {
			t.Fatalf("CNI result: %v %+v", err, result)
		}
		t.Cleanup(func() {
			cniPlugin(t, "DEL", netns, conf)
			harness.RunCmd(exec.Command("ip", "link", "del", bridge))
		})
		ip, _, _ := strings.Cut(result.IPs[0].Address, "/")
		gw := result.IPs[0].Gateway

		runDetached(t, d, rt, []string{"--with-ns", "network:" + netns}, "netcni",
			"sh", "-c", "while true; do echo pod-says-hi | nc -l -p 8080; done")
		res := ctr(t, d, nil, "task", "exec", "--exec-id", "probe", "netcni", "sh", "-c", "ip addr show eth0; ping -c 1 -W 20 "+gw)
		if res.ExitCode != 0 || !strings.Contains(string(res.Stdout), "inet "+result.IPs[0].Address) || !strings.Contains(string(res.Stdout), "1 packets received") {
			t.Errorf("in the container: %v; want %s on eth0 and the gateway %s answering", res, result.IPs[0].Address, gw)
		}
		var got string
		deadline := time.Now().Add(2 * time.Minute)
		for time.Now().Before(deadline) && got != "pod-says-hi\n" {
			if c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, "8080"), 10*time.Second); err == nil {
				c.SetReadDeadline(time.Now().Add(30 * time.Second))
				got, _ = bufio.NewReader(c).ReadString('\n')
				c.Close()
			}
			if got != "pod-says-hi\n" {
				time.Sleep(500 * time.Millisecond)
			}
		}
		if got != "pod-says-hi\n" {
			t.Errorf("%s:8080 from the host: read %q, want pod-says-hi", ip, got)
		}
		ctr(t, d, nil, "task", "kill", "-s", "KILL", "netcni")
		exitStatus(t, d, "netcni", 2*time.Minute)
		ctrOK(t, d, "task", "delete", "netcni")
		ctrOK(t, d, "container", "delete", "netcni")
		if links := linksIn(t, netns); strings.Contains(links, "macvm") {
			t.Errorf("the namespace keeps macvm's tap after the container is gone:\n%s", links)
		}
	})
}

// linksIn lists the links of the namespace at path (ip -n wants a name,
// so enter it with nsenter).
func linksIn(t *testing.T, path string) string {
	t.Helper()
	out, err := harness.CombinedOutput(exec.Command("nsenter", "--net="+path, "ip", "-o", "link"))
	if err != nil {
		t.Fatalf("nsenter ip link: %v\n%s", err, out)
	}
	return string(out)
}

// TestNerdctlPublish: `nerdctl run -p HOSTPORT:PORT` on nerdctl's default
// bridge network (its CNI hook fills the namespace the shim made, portmap
// forwards the host port) reaches a server in the container from the host.
func TestNerdctlPublish(t *testing.T) {
	forEachRuntime(t, false, func(t *testing.T, rt harness.Runtime) {
		bin := filepath.Join(suite.Built.BinDir, "nerdctl")
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("nerdctl is needed (make nerdctl): %v", err)
		}
		if _, err := exec.LookPath("iptables"); err != nil {
			t.Fatalf("CNI's portmap needs iptables (hack/with-deps installs it): %v", err)
		}
		d := daemon(t, rt)
		nerdctl := newNerdctl(t, d, bin)
		// A port per run and runtime, away from the usual ones.
		port := 20000 + (os.Getpid()*7+len(rt.Short)*131+time.Now().Nanosecond())%20000
		res := nerdctl("run", "-d", "--runtime", rt.Name, "--name", "web", "-p", fmt.Sprintf("%d:8080", port),
			harness.BusyboxImage, "sh", "-c", "while true; do echo nerdctl-says-hi | nc -l -p 8080; done")
		if res.ExitCode != 0 {
			t.Fatalf("nerdctl run -p: %v", res)
		}
		t.Cleanup(func() { nerdctl("rm", "-f", "web") })
		// portmap forwards connections to a host address, not to loopback.
		if got := readLine(hostAddress(t), port, "nerdctl-says-hi\n"); got != "nerdctl-says-hi\n" {
			t.Errorf("published port %d: read %q, want nerdctl-says-hi", port, got)
		}
		if res := nerdctl("rm", "-f", "web"); res.ExitCode != 0 {
			t.Errorf("nerdctl rm -f: %v", res)
		}
	})
}

// newNerdctl returns a runner of nerdctl against d with a data root and
// CNI configuration of the test's own; its cleanup removes the bridge of
// nerdctl's default network, which outlives its containers (the next data
// root would refuse its subnet).
func newNerdctl(t *testing.T, d *harness.Containerd, bin string) func(args ...string) harness.Result {
	dir := t.TempDir()
	t.Cleanup(func() { harness.RunCmd(exec.Command("ip", "link", "del", "nerdctl0")) })
	return func(args ...string) harness.Result {
		t.Helper()
		full := append([]string{"--address", d.Address, "--namespace", d.Namespace,
			"--data-root", filepath.Join(dir, "data"), "--cni-path", filepath.Join(suite.Paths.BinDir, "cni"),
			"--cni-netconfpath", filepath.Join(dir, "cni")}, args...)
		cmd := exec.CommandContext(ctx(t, step), bin, full...)
		cmd.Env = append(os.Environ(), "PATH="+suite.Paths.BinDir+":"+os.Getenv("PATH"))
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := harness.RunCmd(cmd)
		res := harness.Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
		if ee, ok := err.(*exec.ExitError); ok {
			res.ExitCode = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("nerdctl %s: %v", strings.Join(args, " "), err)
		}
		return res
	}
}

// readLine connects to host:port until it reads want (a server in a
// container may need a moment after its start), for up to two minutes,
// and returns the last line read.
func readLine(host string, port int, want string) string {
	var got string
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) && got != want {
		if c, err := net.DialTimeout("tcp", net.JoinHostPort(host, fmt.Sprint(port)), 10*time.Second); err == nil {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, _ = bufio.NewReader(c).ReadString('\n')
			c.Close()
		}
		if got != want {
			time.Sleep(500 * time.Millisecond)
		}
	}
	return got
}

// hostAddress is a non-loopback IPv4 address of the host.
func hostAddress(t *testing.T) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
			return ipn.IP.String()
		}
	}
	t.Fatal("the host has no non-loopback IPv4 address")
	return ""
}
