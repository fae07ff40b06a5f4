package cri_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
	"github.com/macvm/macvm/pkg/vm"
)

// templateWait bounds the background template build (a cold boot and a save) on a loaded TCG machine.
const templateWait = 10 * time.Minute

// TestWarmStartPod is the Kubernetes path with warm start (warm_start = "pool" with pool_size = 0, so
// template clones, until the pool part; macvm only): the first
// pod on the CNI bridge boots its VM cold and leaves a template with a tap NIC behind; the second pod's VM
// is a clone of it, with the NIC the template was built with a stand-in for now on the pod's tap. In the
// clone the pod IP CRI reports is on eth0 with the MAC of the pod namespace's interface (not the
// template's), a server container answers on the pod IP from the host and to its sibling over localhost,
// crictl exec works, and stopp/rmp leave no VM and no tap in the pod's network namespace. Then the pool
// (testPoolPod).
func TestWarmStartPod(t *testing.T) {
	rt := harness.Macvm()
	// pool_size = 0 (template clones) until testPoolPod.
	d := daemonWith(t, rt, harness.Options{WarmStart: "pool", MacvmConfigExtra: "pool_size = 0"})

	cold, _ := runPod(t, d, rt, podConfig(d, "warm-cold"))
	if mode := startMode(t, d, cold); mode != "cold" {
		t.Fatalf("first pod: start_mode=%s, want cold", mode)
	}
	// The template is built by a detached builder; the cold pod is not needed for it.
	crictl(t, d, "stopp", cold)
	crictl(t, d, "rmp", cold)
	keys := waitTemplates(t, d)
	if len(keys) != 1 {
		t.Fatalf("templates after one networked pod: %v, want one", keys)
	}

	podID, podPath := runPod(t, d, rt, podConfig(d, "warm-clone"))
	if mode := startMode(t, d, podID); mode != "template" {
		t.Fatalf("second pod: start_mode=%s, want template", mode)
	}
	wantVMs(t, d, 1, "the clone pod")
	ip, netns := podNetwork(t, d, podID)
	// Hold the pod's namespace open: CRI removes its path at stopp, and what stays in it is checked after rmp.
	nsPath := holdNetns(t, netns)
	links := linksIn(t, nsPath)
	t.Logf("links in the pod's network namespace:\n%s", links)
	if !strings.Contains(links, "macvm") {
		t.Fatalf("pod namespace %s has no macvm tap while the pod runs:\n%s", netns, links)
	}
	// (ip, not /sys: nsenter leaves the host's sysfs mounted.)
	mac := ""
	if f := strings.Fields(run(t, "nsenter", "--net="+nsPath, "ip", "-o", "link", "show", "eth0")); len(f) > 0 {
		for i := range f[:len(f)-1] {
			if f[i] == "link/ether" {
				mac = f[i+1]
			}
		}
	}
	if mac == "" {
		t.Fatalf("no eth0 MAC in the pod namespace:\n%s", linksIn(t, nsPath))
	}

	server := startContainer(t, d, podID, podPath, containerConfig("server", "sh", "-c",
		`mkdir -p /www && echo hello-from-clone > /www/index.html && exec httpd -f -p 8080 -h /www`))
	client := startContainer(t, d, podID, podPath, containerConfig("client", "sh", "-c",
		`trap 'exit 0' TERM; while :; do sleep 1; done`))
	for _, id := range []string{server, client} {
		waitState(t, d, id, "CONTAINER_RUNNING")
	}
	sameShim(t, d, podID, server, client)
	wantVMs(t, d, 1, "two containers in the clone pod")

	inVM := crictl(t, d, "exec", server, "sh", "-c", "cat /sys/class/net/eth0/address; ip -o -4 addr show eth0")
	mustContain(t, "pod IP inside the clone", inVM, " "+ip+"/")
	if got, _, _ := strings.Cut(inVM, "\n"); got != mac || got == vm.TemplateMAC(0).String() {
		t.Errorf("eth0 in the clone has MAC %s; want the pod interface's %s (not the template's %s)", got, mac, vm.TemplateMAC(0))
	}
	execUntil(t, d, client, "hello-from-clone", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/")
	getUntil(t, "http://"+ip+":8080/", "hello-from-clone")

	crictl(t, d, "stopp", podID)
	crictl(t, d, "rmp", podID)
	wantVMs(t, d, 0, "after rmp")
	links = linksIn(t, nsPath)
	t.Logf("links left in the pod's network namespace after rmp (CNI's DEL ran):\n%s", links)
	if strings.Contains(links, "macvm") {
		t.Errorf("the pod's network namespace keeps macvm's tap after rmp:\n%s", links)
	}
	if !t.Failed() {
		testPoolPod(t, d, rt, keys[0])
	}
}

// testPoolPod is TestWarmStartPod's pool part (pool_size = 1; each shim reads the config when it starts):
// a pod's VM, a template clone, starts the pool daemon, which fills the pool of the pod's template key;
// the next pod's VM comes from the pool: its stand-in tap moved into the pod's network namespace
// (macvmp*), the pod IP on eth0, a server container reachable on it from the host; stopp/rmp leave no
// macvm tap in the namespace, and once the pool is stopped no VM runs.
func testPoolPod(t *testing.T, d *harness.Containerd, rt harness.Runtime, key string) {
	if err := harness.WriteMacvmConfigExtra(d.MacvmConfig, suite.Paths, "pool", d.TemplateDir, "pool_size = 1"); err != nil {
		t.Fatal(err)
	}
	poolDir := filepath.Join(d.TemplateDir, "pool")
	seed, _ := runPod(t, d, rt, podConfig(d, "warm-seed"))
	if mode := startMode(t, d, seed); mode != "template" {
		t.Fatalf("pod asking the pool first: start_mode=%s, want template", mode)
	}
	crictl(t, d, "stopp", seed)
	crictl(t, d, "rmp", seed)
	for deadline := time.Now().Add(3 * time.Minute); ; {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := vm.PoolStatus(c, poolDir)
		cancel()
		if err == nil && st[key].Ready >= 1 {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(poolDir, "pool.log"))
			t.Fatalf("pool of %s: no ready VM (%v %v); pool.log:\n%s", key, st, err, b)
		}
		time.Sleep(300 * time.Millisecond)
	}

	podID, podPath := runPod(t, d, rt, podConfig(d, "warm-pool"))
	if mode := startMode(t, d, podID); mode != "pool" {
		t.Errorf("pod after the pool filled: start_mode=%s, want pool", mode)
	}
	ip, netns := podNetwork(t, d, podID)
	nsPath := holdNetns(t, netns)
	if links := linksIn(t, nsPath); !strings.Contains(links, "macvmp") {
		t.Errorf("pod namespace %s has no adopted tap (macvmp*) while the pooled pod runs:\n%s", netns, links)
	}
	server := startContainer(t, d, podID, podPath, containerConfig("server", "sh", "-c",
		`mkdir -p /www && echo hello-from-pool > /www/index.html && exec httpd -f -p 8080 -h /www`))
	waitState(t, d, server, "CONTAINER_RUNNING")
	mustContain(t, "pod IP inside the pooled VM", crictl(t, d, "exec", server, "ip", "-o", "-4", "addr", "show", "eth0"), " "+ip+"/")
	getUntil(t, "http://"+ip+":8080/", "hello-from-pool")
	crictl(t, d, "stopp", podID)
	crictl(t, d, "rmp", podID)
	if links := linksIn(t, nsPath); strings.Contains(links, "macvm") {
		t.Errorf("the pooled pod's network namespace keeps macvm's taps after rmp:\n%s", links)
	}
	if err := vm.StopPool(poolDir, 30*time.Second); err != nil {
		t.Errorf("stopping the pool: %v", err)
	}
	wantVMs(t, d, 0, "after rmp and the pool stopped")
}

var startModeRE = regexp.MustCompile(`start_mode=(\w+)`)

// startMode is the start_mode the shim logged when the VM of pod sandbox id was ready.
func startMode(t *testing.T, d *harness.Containerd, id string) string {
	t.Helper()
	b, err := os.ReadFile(d.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	idRE := regexp.MustCompile(`container_id=` + regexp.QuoteMeta(id) + `(\s|$)`)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "VM ready") && idRE.MatchString(l) {
			if m := startModeRE.FindStringSubmatch(l); m != nil {
				t.Logf("%s: %s", id, l)
				return m[1]
			}
		}
	}
	t.Fatalf("no start_mode line for %s in containerd's log:\n%s", id, d.LogTail(4000))
	return ""
}

// waitTemplates waits until the template cache holds at least one complete template (one with a
// manifest) and returns their keys.
func waitTemplates(t *testing.T, d *harness.Containerd) []string {
	t.Helper()
	return d.WaitTemplates(t, templateWait, func(keys []string) bool { return len(keys) > 0 })
}

// podNetwork is the pod's IP and the path of its network namespace, from `crictl inspectp`.
func podNetwork(t *testing.T, d *harness.Containerd, podID string) (ip, netns string) {
	t.Helper()
	out := crictl(t, d, "inspectp", "-o", "json", podID)
	var st struct {
		Status struct {
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("crictl inspectp: %v\n%s", err, out)
	}
	for _, ns := range st.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			netns = ns.Path
		}
	}
	if st.Status.Network.IP == "" || netns == "" {
		t.Fatalf("pod %s: IP %q, network namespace %q in crictl inspectp; want both:\n%s", podID, st.Status.Network.IP, netns, out)
	}
	return st.Status.Network.IP, netns
}

// holdNetns keeps the network namespace at netns open until the test ends
// (CRI removes that path at stopp) and returns a path to it that stays.
func holdNetns(t *testing.T, netns string) string {
	t.Helper()
	f, err := os.Open(netns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), f.Fd())
}

// linksIn is `ip -o link` in the network namespace at path.
func linksIn(t *testing.T, path string) string {
	t.Helper()
	return run(t, "nsenter", "--net="+path, "ip", "-o", "link")
}

// run runs a host command and fails the test unless it succeeds; it returns its output.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := harness.CombinedOutput(exec.Command(name, args...))
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
