package containerd_test

import (
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
	"sync"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
	"github.com/macvm/macvm/pkg/network"
)

// cniAttachment is a network namespace CNI's bridge plugin filled.
type cniAttachment struct {
	netns, ip, cidr, gw, mac string
}

// cniAttach creates a network namespace in a directory of its own (its
// name is the CNI container id) and runs the bridge plugin's ADD with
// conf in it; the cleanup runs DEL and removes the namespace.
func cniAttach(t *testing.T, conf string) cniAttachment {
	t.Helper()
	netns := filepath.Join(t.TempDir(), "netns")
	if err := network.CreateNetns(netns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { network.RemoveNetns(netns) })
	var result struct {
		Interfaces []struct {
			Name    string `json:"name"`
			MAC     string `json:"mac"`
			Sandbox string `json:"sandbox"`
		} `json:"interfaces"`
		IPs []struct {
			Address string `json:"address"`
			Gateway string `json:"gateway"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(cniPlugin(t, "ADD", netns, conf), &result); err != nil || len(result.IPs) == 0 {
		t.Fatalf("CNI result: %v %+v", err, result)
	}
	t.Cleanup(func() { cniPlugin(t, "DEL", netns, conf) })
	a := cniAttachment{netns: netns, cidr: result.IPs[0].Address, gw: result.IPs[0].Gateway}
	a.ip, _, _ = strings.Cut(a.cidr, "/")
	for _, i := range result.Interfaces {
		if i.Name == "eth0" && i.Sandbox != "" {
			a.mac = i.MAC
		}
	}
	if a.mac == "" {
		t.Fatalf("CNI result has no eth0 in the namespace: %+v", result)
	}
	return a
}

// waitTemplates waits until the cache holds n complete templates.
func waitTemplates(t *testing.T, d *harness.Containerd, n int) []string {
	t.Helper()
	return d.WaitTemplates(t, 2*templateWait, func(keys []string) bool { return len(keys) >= n })
}

// TestWarmStartNetwork: VMs with NICs start from templates built with
// stand-in backends, then from the pool. With warm_start = "pool" and
// pool_size = 0 first (no pool: template clones): the first container on
// a CNI bridge and the first on the host-NAT stack boot cold and each
// makes a template (tap / datagram NIC); then two CNI containers started
// at once are template clones with the MACs and addresses CNI gave them
// (not the template's), links up, reachable from the host (so frames to
// the new MAC get through QEMU's receive filter), pinging their gateway,
// and leave no tap behind; a host-NAT clone reaches a host server and
// resolves a name; `nerdctl run -p` from the tap template serves its
// published port. Then pool_size = 1 (testPoolNetwork): pooled VMs serve
// both NIC kinds.
func TestWarmStartNetwork(t *testing.T) {
	rt := harness.Macvm()
	d := daemonWith(t, rt, harness.Options{Paths: suite.Paths, WarmStart: "pool", MacvmConfigExtra: "pool_size = 0"})
	dir := t.TempDir()
	n := os.Getpid()%200 + time.Now().Nanosecond()%50
	bridge := fmt.Sprintf("mvmwarm%d", n)
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "e2e-warm", "type": "bridge", "bridge": %q, "isGateway": true,
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.%d.0/24"}]], "dataDir": %q}}`, bridge, n, filepath.Join(dir, "ipam"))
	t.Cleanup(func() { harness.RunCmd(exec.Command("ip", "link", "del", bridge)) })
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello-from-host\n") }))
	defer srv.Close()
	natScript := fmt.Sprintf("wget -q -O - http://%s:%d/ && nslookup host.macvm.internal %s",
		network.HostIP, srv.Listener.Addr().(*net.TCPAddr).Port, network.GatewayIP)
	natOK := func(res harness.Result) bool {
		return res.ExitCode == 0 && strings.Contains(string(res.Stdout), "hello-from-host") &&
			strings.Contains(string(res.Stdout), "Address: "+network.HostIP)
	}

	// Cold: one VM of each NIC kind; each leaves a template build behind.
	first := cniAttach(t, conf)
	res := run(t, d, rt, nil, []string{"--with-ns", "network:" + first.netns}, "wnet-cold", "ip", "addr", "show", "eth0")
	if res.ExitCode != 0 || !strings.Contains(string(res.Stdout), "inet "+first.cidr) {
		t.Fatalf("cold CNI container: %v; want %s on eth0", res, first.cidr)
	}
	if mode := startMode(t, d, "wnet-cold"); mode != "cold" {
		t.Fatalf("first CNI container: start_mode=%s, want cold", mode)
	}
	if res := run(t, d, rt, nil, []string{"--net-host"}, "wnat-cold", "sh", "-c", natScript); !natOK(res) {
		t.Fatalf("cold host-NAT container: %v", res)
	}
	if mode := startMode(t, d, "wnat-cold"); mode != "cold" {
		t.Fatalf("first host-NAT container: start_mode=%s, want cold", mode)
	}
	keys := waitTemplates(t, d, 2)

	// Two CNI clones at once, each in a namespace of its own.
	atts := []cniAttachment{first, cniAttach(t, conf)}
	ids := []string{"wnet-a", "wnet-b"}
	results := make([]harness.Result, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range atts {
		wg.Go(func() {
			results[i], errs[i] = d.Ctr(ctx(t, step), nil, d.RunArgs(rt, []string{"-d", "--with-ns", "network:" + atts[i].netns}, ids[i],
				"sh", "-c", fmt.Sprintf("while true; do echo hi-from-%s | nc -l -p 8080; done", ids[i]))...)
		})
	}
	wg.Wait()
	for i := range atts {
		if errs[i] != nil || results[i].ExitCode != 0 {
			t.Fatalf("ctr run -d %s: %v %v", ids[i], errs[i], results[i])
		}
	}
	if atts[0].mac == atts[1].mac || atts[0].ip == atts[1].ip {
		t.Fatalf("CNI gave both namespaces the same MAC or address: %+v", atts)
	}
	for i, a := range atts {
		id := ids[i]
		if mode := startMode(t, d, id); mode != "template" {
			t.Errorf("%s: start_mode=%s, want template", id, mode)
		}
		res := ctr(t, d, nil, "task", "exec", "--exec-id", "probe", id, "sh", "-c",
			"cat /sys/class/net/eth0/address /sys/class/net/eth0/operstate /sys/class/net/eth0/carrier; ip -4 addr show eth0; ping -c 1 -W 20 "+a.gw+"; ip neigh")
		out := string(res.Stdout)
		t.Logf("%s, in the clone:\n%s", id, out)
		lines := strings.Split(out, "\n")
		if res.ExitCode != 0 || len(lines) < 3 || lines[0] != a.mac || lines[1] != "up" || lines[2] != "1" ||
			!strings.Contains(out, "inet "+a.cidr) || !strings.Contains(out, "1 packets received") {
			t.Errorf("%s: %v; want MAC %s, link up with carrier, %s, the gateway %s answering", id, res, a.mac, a.cidr, a.gw)
		}
		// Neighbours: only what this clone's traffic made (the gateway).
		for _, l := range lines {
			if strings.Contains(l, " dev ") && !strings.HasPrefix(l, a.gw+" ") {
				t.Errorf("%s: stale neighbour entry %q", id, l)
			}
		}
		want := "hi-from-" + id + "\n"
		if got := readLine(a.ip, 8080, want); got != want {
			t.Errorf("%s:8080 from the host: read %q, want %q", a.ip, got, want)
		}
	}
	for i, id := range ids {
		ctr(t, d, nil, "task", "kill", "-s", "KILL", id)
		exitStatus(t, d, id, 2*time.Minute)
		ctrOK(t, d, "task", "delete", id)
		ctrOK(t, d, "container", "delete", id)
		if links := linksIn(t, atts[i].netns); strings.Contains(links, "macvm") {
			t.Errorf("%s: the namespace keeps macvm's tap after the container is gone:\n%s", id, links)
		}
	}

	// A host-NAT clone: its own stack, the template's datagram NIC.
	if res := run(t, d, rt, nil, []string{"--net-host"}, "wnat-clone", "sh", "-c", natScript); !natOK(res) {
		t.Errorf("host-NAT clone: %v; want the host server's reply and host.macvm.internal = %s", res, network.HostIP)
	}
	if mode := startMode(t, d, "wnat-clone"); mode != "template" {
		t.Errorf("host-NAT clone: start_mode=%s, want template", mode)
	}

	// nerdctl's default bridge network (its CNI hook in the shim's own
	// namespace): a tap NIC, so the tap template.
	bin := filepath.Join(suite.Built.BinDir, "nerdctl")
	nerdctl := newNerdctl(t, d, bin)
	port := 20000 + (os.Getpid()*7+time.Now().Nanosecond())%20000
	res = nerdctl("run", "-d", "--runtime", rt.Name, "--name", "wweb", "-p", fmt.Sprintf("%d:8080", port),
		harness.BusyboxImage, "sh", "-c", "while true; do echo nerdctl-clone-says-hi | nc -l -p 8080; done")
	if res.ExitCode != 0 {
		t.Fatalf("nerdctl run -p: %v", res)
	}
	t.Cleanup(func() { nerdctl("rm", "-f", "wweb") })
	if mode := startMode(t, d, strings.TrimSpace(string(res.Stdout))); mode != "template" {
		t.Errorf("nerdctl run -p: start_mode=%s, want template", mode)
	}
	if got := readLine(hostAddress(t), port, "nerdctl-clone-says-hi\n"); got != "nerdctl-clone-says-hi\n" {
		t.Errorf("published port %d of a clone: read %q, want nerdctl-clone-says-hi", port, got)
	}
	if res := nerdctl("rm", "-f", "wweb"); res.ExitCode != 0 {
		t.Errorf("nerdctl rm -f: %v", res)
	}
	if l, err := d.WaitClean(time.Minute, true); err != nil || len(l.Procs) > 0 {
		t.Errorf("processes left after the builds: %v %s", err, l)
	}
	if t.Failed() {
		return
	}
	testPoolNetwork(t, d, rt, conf, keys, natScript, natOK, nerdctl)
}

// testPoolNetwork is TestWarmStartNetwork's pool part, on its templates
// (keys: the tap and the datagram NIC's): with pool_size = 1 a CNI and a
// host-NAT container are template clones that make the pool daemon fill
// a pool for each key; then a CNI container gets a pooled VM whose
// stand-in tap moved into its namespace (macvmp*), with CNI's MAC and
// address, its gateway answering, reachable from the host, and no tap
// left in the namespace once it is gone; a host-NAT container gets a
// pooled VM whose socket the stack adopted (a host server answers, a
// name resolves); `nerdctl run -p` on its default bridge (its CNI hook
// fills a namespace the shim made) gets a pooled VM serving its published
// port. `macvm-pool-stop` leaves no qemu and no VM directory.
func testPoolNetwork(t *testing.T, d *harness.Containerd, rt harness.Runtime, conf string, keys []string, natScript string,
	natOK func(harness.Result) bool, nerdctl func(args ...string) harness.Result) {
	// Each shim reads the configuration when it starts.
	if err := harness.WriteMacvmConfigExtra(d.MacvmConfig, suite.Paths, "pool", d.TemplateDir, "pool_size = 1"); err != nil {
		t.Fatal(err)
	}
	poolDir := filepath.Join(d.TemplateDir, "pool")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(poolDir, "pool.log"))
			t.Logf("pool.log:\n%s", b)
		}
	})
	cniProbe := func(id string, a cniAttachment) {
		t.Helper()
		res := ctr(t, d, nil, "task", "exec", "--exec-id", "probe", id, "sh", "-c",
			"cat /sys/class/net/eth0/address /sys/class/net/eth0/operstate; ip -4 addr show eth0; ping -c 1 -W 20 "+a.gw)
		out := string(res.Stdout)
		lines := strings.Split(out, "\n")
		if res.ExitCode != 0 || len(lines) < 2 || lines[0] != a.mac || lines[1] != "up" ||
			!strings.Contains(out, "inet "+a.cidr) || !strings.Contains(out, "1 packets received") {
			t.Errorf("%s: %v; want MAC %s, link up, %s, the gateway %s answering", id, res, a.mac, a.cidr, a.gw)
		}
	}

	// Template clones that ask the pool for their keys: the first starts
	// the daemon, the second adds its key.
	seed := cniAttach(t, conf)
	if res := run(t, d, rt, nil, []string{"--with-ns", "network:" + seed.netns}, "pnet-seed", "ip", "addr", "show", "eth0"); res.ExitCode != 0 ||
		!strings.Contains(string(res.Stdout), "inet "+seed.cidr) {
		t.Fatalf("CNI container asking the pool: %v; want %s on eth0", res, seed.cidr)
	}
	if mode := startMode(t, d, "pnet-seed"); mode != "template" {
		t.Fatalf("pnet-seed: start_mode=%s, want template (the pool starts now)", mode)
	}
	if res := run(t, d, rt, nil, []string{"--net-host"}, "pnat-seed", "sh", "-c", natScript); !natOK(res) {
		t.Fatalf("host-NAT container asking the pool: %v", res)
	}
	for _, key := range keys {
		waitPool(t, poolDir, key, 1)
	}

	// A CNI container from the pool.
	a := cniAttach(t, conf)
	id := "pnet-pool"
	runDetached(t, d, rt, []string{"--with-ns", "network:" + a.netns}, id,
		"sh", "-c", "while true; do echo hi-from-pool | nc -l -p 8080; done")
	waitStatus(t, d, id, "RUNNING", 2*time.Minute)
	if mode := startMode(t, d, id); mode != "pool" {
		t.Errorf("%s: start_mode=%s, want pool", id, mode)
	}
	if links := linksIn(t, a.netns); !strings.Contains(links, "macvmp") {
		t.Errorf("%s: no adopted tap (macvmp*) in the namespace:\n%s", id, links)
	}
	cniProbe(id, a)
	if got := readLine(a.ip, 8080, "hi-from-pool\n"); got != "hi-from-pool\n" {
		t.Errorf("%s:8080 from the host: read %q, want hi-from-pool", a.ip, got)
	}
	ctr(t, d, nil, "task", "kill", "-s", "KILL", id)
	exitStatus(t, d, id, 2*time.Minute)
	ctrOK(t, d, "task", "delete", id)
	ctrOK(t, d, "container", "delete", id)
	if links := linksIn(t, a.netns); strings.Contains(links, "macvm") {
		t.Errorf("%s: the namespace keeps macvm's taps after the container is gone:\n%s", id, links)
	}

	// A host-NAT container from the pool.
	if res := run(t, d, rt, nil, []string{"--net-host"}, "pnat-pool", "sh", "-c", natScript); !natOK(res) {
		t.Errorf("pooled host-NAT container: %v; want the host server's reply and host.macvm.internal = %s", res, network.HostIP)
	}
	if mode := startMode(t, d, "pnat-pool"); mode != "pool" {
		t.Errorf("pnat-pool: start_mode=%s, want pool", mode)
	}

	// nerdctl's default bridge: the tap key's pool, refilled.
	for _, key := range keys {
		waitPool(t, poolDir, key, 1)
	}
	port := 20000 + (os.Getpid()*11+time.Now().Nanosecond())%20000
	res := nerdctl("run", "-d", "--runtime", rt.Name, "--name", "pweb", "-p", fmt.Sprintf("%d:8080", port),
		harness.BusyboxImage, "sh", "-c", "while true; do echo nerdctl-pool-says-hi | nc -l -p 8080; done")
	if res.ExitCode != 0 {
		t.Fatalf("nerdctl run -p from the pool: %v", res)
	}
	t.Cleanup(func() { nerdctl("rm", "-f", "pweb") })
	if mode := startMode(t, d, strings.TrimSpace(string(res.Stdout))); mode != "pool" {
		t.Errorf("nerdctl run -p: start_mode=%s, want pool", mode)
	}
	if got := readLine(hostAddress(t), port, "nerdctl-pool-says-hi\n"); got != "nerdctl-pool-says-hi\n" {
		t.Errorf("published port %d of a pooled VM: read %q, want nerdctl-pool-says-hi", port, got)
	}
	if res := nerdctl("rm", "-f", "pweb"); res.ExitCode != 0 {
		t.Errorf("nerdctl rm -f: %v", res)
	}

	stopPoolClean(t, d)
}
