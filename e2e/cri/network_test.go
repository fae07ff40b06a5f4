package cri_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// TestPodNetwork puts a pod on the daemon's CNI bridge network: the pod's IP, as CRI reports it, must be
// configured inside the pod (in macvm's case inside the VM, on the NIC that took over the pod's network
// namespace) and a server in the pod must be reachable from the host at that address.
func TestPodNetwork(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt, harness.CRIConfig{})
		podID, podPath := runPod(t, d, rt, podConfig(d, "net"))
		out := crictl(t, d, "inspectp", "-o", "json", podID)
		var st struct {
			Status struct {
				Network struct {
					IP string `json:"ip"`
				} `json:"network"`
			} `json:"status"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("crictl inspectp: %v\n%s", err, out)
		}
		ip := st.Status.Network.IP
		if ip == "" {
			t.Fatalf("pod on the bridge network has no IP in crictl inspectp:\n%s", out)
		}
		t.Logf("pod IP %s (subnet %s)", ip, d.PodSubnet())
		id := startContainer(t, d, podID, podPath, containerConfig("web", "sh", "-c",
			`mkdir -p /www && echo hello-from-pod > /www/index.html && exec httpd -f -p 8080 -h /www`))
		waitState(t, d, id, "CONTAINER_RUNNING")

		addrs := crictl(t, d, "exec", id, "ip", "-o", "-4", "addr", "show")
		mustContain(t, "addresses inside the pod", addrs, " "+ip+"/")

		getUntil(t, "http://"+ip+":8080/", "hello-from-pod")
	})
}

// getUntil GETs url from the host until it answers want (the pod's server may still be starting), for
// up to two minutes.
func getUntil(t *testing.T, url, want string) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		body, err := get(client, url)
		if err == nil && body == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s from the host: %q, %v; want %s", url, body, err, want)
		}
		time.Sleep(time.Second)
	}
}

func get(c *http.Client, url string) (string, error) {
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b)), err
}
