// Package critest runs cri-tools' critest validation suite against containerd's CRI plugin, once with
// the runc handler and once with the macvm handler, and compares the two: every spec that passes on runc
// must pass on macvm unless the difference is listed, with its reason, in Differences.
//
// The machines reach no public registry, so critest's images are rebuilt locally
// (harness.CritestImages), pushed to a private distribution registry, and containerd mirrors
// registry.k8s.io and gcr.io to it through its registry hosts directory.
package critest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// Registry is a private distribution registry (the pinned `registry` binary) on a loopback port.
type Registry struct {
	// Addr is HOST:PORT.
	Addr string
	// HostsDir is a containerd registry hosts directory that sends the mirrored registries to Addr.
	HostsDir string
	cmd      *exec.Cmd
	done     chan struct{}
}

// MirroredRegistries are the registries critest's images come from.
var MirroredRegistries = []string{"registry.k8s.io", "gcr.io"}

// StartRegistry starts the registry binary from binDir, storing under dir.
func StartRegistry(ctx context.Context, binDir, dir string) (*Registry, error) {
	// A free port: bind, note, release. Another process could take it in between; the registry's start
	// then fails and says so.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg := filepath.Join(dir, "registry.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "registry"), addr)), 0o644); err != nil {
		return nil, err
	}
	r := &Registry{Addr: addr, HostsDir: filepath.Join(dir, "hosts"), done: make(chan struct{})}
	for _, host := range MirroredRegistries {
		d := filepath.Join(r.HostsDir, host)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		hosts := fmt.Sprintf("server = \"https://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", host, addr)
		if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o644); err != nil {
			return nil, err
		}
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.cmd = exec.Command(filepath.Join(binDir, "registry"), "serve", cfg)
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := harness.StartCmd(r.cmd, nil); err != nil {
		return nil, fmt.Errorf("starting registry: %w", err)
	}
	go func() {
		_ = harness.WaitCmd(r.cmd)
		close(r.done)
	}()
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r, nil
			}
		}
		select {
		case <-r.done:
			b, _ := os.ReadFile(filepath.Join(dir, "registry.log"))
			return nil, fmt.Errorf("registry exited during start-up: %s", b)
		case <-ctx.Done():
			r.Stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.Stop()
			return nil, fmt.Errorf("registry on %s did not answer within a minute", addr)
		}
	}
}

// Stop ends the registry by PID and waits for it.
func (r *Registry) Stop() {
	_ = r.cmd.Process.Kill()
	<-r.done
}

// Push builds every image and pushes it under each of its references (their registry host replaced by
// the local registry's address), through the daemon's ctr in a staging namespace.
func (r *Registry) Push(ctx context.Context, d *harness.Containerd, imgs []harness.TaggedImage) error {
	const ns = "critest-staging"
	ctr := func(args ...string) error {
		cmd := exec.CommandContext(ctx, filepath.Join(d.BinDir(), "ctr"), append([]string{"--address", d.Address, "--namespace", ns}, args...)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := harness.RunCmd(cmd); err != nil {
			return fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, harness.Filtered(out.Bytes()))
		}
		return nil
	}
	for _, img := range imgs {
		first := img.Refs[0]
		img.Image.Name = first
		if err := d.ImportImage(ctx, ns, img.Image); err != nil {
			return err
		}
		for _, ref := range img.Refs {
			local := r.Addr + "/" + ref[strings.Index(ref, "/")+1:]
			if err := ctr("images", "tag", "--force", first, local); err != nil {
				return err
			}
			if err := ctr("images", "push", "--plain-http", local); err != nil {
				return err
			}
		}
	}
	return nil
}
