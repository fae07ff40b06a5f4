package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// CRI side of the harness: containerd's CRI plugin configured privately (CNI directories, a locally
// imported pause image, registry mirrors), crictl pointed at the daemon, and the images CRI needs
// imported into its namespace.

const (
	// CRINamespace is the containerd namespace the CRI plugin keeps its pods, containers and images in.
	CRINamespace = "k8s.io"
	// PauseImage is containerd 2.4's default sandbox image. The harness builds a stand-in locally (see
	// PauseImageSpec) and pins it, so the CRI plugin never tries to pull it.
	PauseImage = "registry.k8s.io/pause:3.10.2"
	// CRIRuncHandler and CRIMacvmHandler are the runtime handler names the harness registers with CRI
	// (crictl runp --runtime NAME, RuntimeClass handler).
	CRIRuncHandler  = "runc"
	CRIMacvmHandler = "macvm"
)

// CRIConfig configures containerd's CRI plugin for a harness daemon.
type CRIConfig struct {
	// CNIBinDir holds the CNI plugins (default BinDir/cni): bridge, host-local and loopback at least.
	CNIBinDir string
	// CNIConfList is the CNI network configuration list (JSON) the harness writes to its private conf
	// dir; empty means the daemon's bridge network (BridgeConfList). containerd's CRI plugin needs an
	// eth0 with an address in every pod that is not on the host network, so loopback alone is not enough.
	CNIConfList string
	// RegistryHostsDir is containerd's registry hosts directory (DIR/HOST/hosts.toml), used to mirror
	// registries to a local one; empty leaves registries as they are.
	RegistryHostsDir string
}

// CNIConfDir is the daemon's private CNI configuration directory.
func (c *Containerd) CNIConfDir() string { return filepath.Join(c.Dir, "cni", "net.d") }

// CNIBinDir is the directory containerd looks for CNI plugins in.
func (c *Containerd) CNIBinDir() string {
	if c.opts.CRIConfig.CNIBinDir != "" {
		return c.opts.CRIConfig.CNIBinDir
	}
	return filepath.Join(c.opts.Paths.BinDir, "cni")
}

// Bridge is the name of the daemon's CNI bridge: unique per daemon (from its directory's random
// suffix), at most 15 bytes, removed by Cleanup.
func (c *Containerd) Bridge() string {
	return bridgeName(c.Dir)
}

// bridgeName is the CNI bridge of the daemon whose directory is dir (the guardian removes it too).
func bridgeName(dir string) string {
	s := strings.TrimPrefix(filepath.Base(dir), "mvm-")
	if len(s) > 12 {
		s = s[len(s)-12:]
	}
	return "mvm" + s
}

// removeBridgeOf deletes the CNI bridge of the daemon in dir, if it made one.
func removeBridgeOf(dir string) {
	if _, err := os.Stat(filepath.Join(dir, "cni", "net.d")); err != nil {
		return
	}
	_ = RunCmd(exec.Command("ip", "link", "del", bridgeName(dir)))
}

// PodSubnet is the daemon's pod subnet, a /24 in 10.128.0.0/9 derived from its directory's suffix so
// concurrent daemons rarely collide.
func (c *Containerd) PodSubnet() string {
	n, _ := strconv.ParseUint(c.suffixNumber(9), 10, 64)
	return fmt.Sprintf("10.%d.%d.0/24", 128+n%127, (n/127)%256)
}

// suffixNumber is up to n trailing digits of the directory's random suffix.
func (c *Containerd) suffixNumber(n int) string {
	s := strings.TrimPrefix(filepath.Base(c.Dir), "mvm-")
	if len(s) > n {
		s = s[len(s)-n:]
	}
	return s
}

// BridgeConfList is the daemon's default CNI network: a bridge that is the pods' gateway, host-local
// addresses from PodSubnet, and loopback. No masquerading and no port mapping (they need iptables rules
// that would outlive a killed test): pods are reachable from the host, not from outside.
func (c *Containerd) BridgeConfList() string {
	return fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "e2e-bridge",
  "plugins": [
    {"type": "bridge", "bridge": %q, "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "dataDir": %q}},
    {"type": "loopback"}
  ]
}
`, c.Bridge(), c.PodSubnet(), filepath.Join(c.Dir, "cni", "ipam"))
}

func (c *Containerd) writeCNIConfig() error {
	if err := os.MkdirAll(c.CNIConfDir(), 0o755); err != nil {
		return err
	}
	conf := c.opts.CRIConfig.CNIConfList
	if conf == "" {
		conf = c.BridgeConfList()
	}
	return os.WriteFile(filepath.Join(c.CNIConfDir(), "10-e2e.conflist"), []byte(conf), 0o644)
}

// removeBridge deletes the daemon's CNI bridge, which the bridge plugin leaves behind after the last pod.
func (c *Containerd) removeBridge() {
	if c.opts.CRI {
		removeBridgeOf(c.Dir)
	}
}

// criConfig renders the CRI plugin's part of config.toml. It only adds sub-tables of the tables
// config() already opened, as TOML requires.
func (c *Containerd) criConfig() string {
	registry := ""
	if d := c.opts.CRIConfig.RegistryHostsDir; d != "" {
		registry = fmt.Sprintf("\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = %q\n", d)
	}
	return fmt.Sprintf(`
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = [%[1]q]
  conf_dir = %[2]q

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = %[3]q

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  Root = %[4]q

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = %[5]q
%[6]s`, c.CNIBinDir(), c.CNIConfDir(), RuncName, c.RuncRoot, PauseImage, registry)
}

// PauseImageSpec is the local stand-in for the pause image: e2etools' pause as PID 1, which reaps
// adopted children while it waits (a shared PID namespace makes it every container's init) and
// exits at SIGTERM or SIGINT, and, like the real one, runs no other process.
func PauseImageSpec() Image {
	return Image{
		Name:       PauseImage,
		Entrypoint: []string{"/usr/bin/pause"},
		Cmd:        []string{},
	}
}

// ImportImage builds img and imports it into containerd namespace ns.
func (c *Containerd) ImportImage(ctx context.Context, ns string, img Image) error {
	f, err := os.CreateTemp(c.Dir, "image-*.tar")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := BuildImage(f, img); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(c.opts.Paths.BinDir, "ctr"), "--address", c.Address, "--namespace", ns,
		"images", "import", f.Name())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := RunCmd(cmd); err != nil {
		return fmt.Errorf("ctr -n %s images import %s: %w: %s", ns, img.Name, err, Filtered(out.Bytes()))
	}
	return nil
}

// ImportCRIImages imports the pause image and the busybox test image into CRI's namespace.
func (c *Containerd) ImportCRIImages(ctx context.Context) error {
	for _, img := range []Image{PauseImageSpec(), {Name: BusyboxImage}} {
		if err := c.ImportImage(ctx, CRINamespace, img); err != nil {
			return err
		}
	}
	return nil
}

// CrictlConfig is the crictl.yaml the harness writes, so crictl never reads the machine's
// /etc/crictl.yaml or talks to the default containerd socket.
func (c *Containerd) CrictlConfig() string { return filepath.Join(c.Dir, "crictl.yaml") }

// CrictlCommand returns an exec.Cmd for crictl talking to this daemon; start it with StartCmd.
func (c *Containerd) CrictlCommand(ctx context.Context, args ...string) (*exec.Cmd, error) {
	if _, err := os.Stat(c.CrictlConfig()); os.IsNotExist(err) {
		cfg := fmt.Sprintf("runtime-endpoint: unix://%[1]s\nimage-endpoint: unix://%[1]s\ntimeout: 300\n", c.Address)
		if err := os.WriteFile(c.CrictlConfig(), []byte(cfg), 0o644); err != nil {
			return nil, err
		}
	}
	bin := filepath.Join(c.opts.Paths.BinDir, "crictl")
	if err := isExecutable(bin); err != nil {
		return nil, fmt.Errorf("crictl: %w (run `make cri-tools`)", err)
	}
	cmd := exec.CommandContext(ctx, bin, append([]string{"--config", c.CrictlConfig()}, args...)...)
	cmd.WaitDelay = 5 * time.Second
	return cmd, nil
}

// Crictl runs crictl with args and collects its output. A non-zero exit is a Result, not an error; the
// error is for crictl failing to run at all or ctx ending.
func (c *Containerd) Crictl(ctx context.Context, args ...string) (Result, error) {
	cmd, err := c.CrictlCommand(ctx, args...)
	if err != nil {
		return Result{}, err
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err = RunCmd(cmd)
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Duration: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return res, fmt.Errorf("crictl %s: %w (%v)", strings.Join(args, " "), ctx.Err(), res)
	case errors.As(err, &ee):
		res.ExitCode = ee.ExitCode()
	default:
		return res, fmt.Errorf("crictl %s: %w", strings.Join(args, " "), err)
	}
	return res, nil
}

// CRIBundleDir is containerd's bundle directory for a CRI container or pod sandbox id.
func (c *Containerd) CRIBundleDir(id string) string {
	return filepath.Join(c.State, "io.containerd.runtime.v2.task", CRINamespace, id)
}

// CRIShimPid finds the shim serving the CRI container or pod sandbox id.
func (c *Containerd) CRIShimPid(id string) (int, error) {
	return shimPidOf(c.CRIBundleDir(id))
}

// BinDir is the directory the daemon's binaries (containerd, ctr, shims, CRI tools) come from.
func (c *Containerd) BinDir() string { return c.opts.Paths.BinDir }
