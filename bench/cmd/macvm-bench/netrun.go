package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// The networked start: `nerdctl run --rm` on nerdctl's default bridge
// network ("bridge": the CNI bridge nerdctl0, its host-local addresses,
// portmap and firewall), which nerdctl's OCI hook sets up in the container's
// network namespace before the container starts and tears down after it
// exits. For runc that is a veth in the namespace; for macvm the shim turns
// the namespace's interface into the VM's tap NIC, and with warm start a
// template (or pooled VM) of its own NIC key serves it.
//
// nerdctl passes no runtime options for a runtime other than runc, so the
// per-variant shim config that ctr gets through --runtime-config-path
// reaches the shim another way: each macvm variant has its own runtime name
// (io.containerd.bench<variant>.v1), which containerd resolves to a
// wrapper in the snapshot's bin directory that sets MACVM_CONFIG and execs
// the same shim binary.

// nerdctlBridge is the bridge of nerdctl's default network.
const nerdctlBridge = "nerdctl0"

// nerdctlSetup is what the networked measurements need, made once.
type nerdctlSetup struct {
	bin, binDir, dataRoot, cniPath, netConfPath string
	// natChainsBefore are the nat table's CNI-<hash> chains when the run
	// began (see cleanupNerdctl).
	natChainsBefore []string
	chainsKnown     bool
	// removeBridge is true when nerdctl0 did not exist before the run, so
	// the clean-up deletes it.
	removeBridge bool
}

// netRuntime is the runtime name nerdctl is given for v.
func (v *variant) netRuntime() string {
	if !v.vm() {
		return v.rt.Name
	}
	return "io.containerd.bench" + strings.ReplaceAll(v.info.Name, "-", "") + ".v1"
}

// setupNerdctl copies nerdctl into the snapshot and writes each macvm
// variant's shim wrapper there (containerd finds shims through its PATH,
// which starts with the snapshot's bin directory).
func (b *bench) setupNerdctl(srcBinDir, snapBinDir, snapDir string) error {
	bin := filepath.Join(snapBinDir, "nerdctl")
	if err := copyFileTo(filepath.Join(srcBinDir, "nerdctl"), bin); err != nil {
		return fmt.Errorf("nerdctl (make nerdctl): %w", err)
	}
	if err := os.Chmod(bin, 0o755); err != nil {
		return err
	}
	shim := filepath.Join(snapBinDir, "containerd-shim-macvm-v1")
	for _, v := range b.variants {
		if !v.vm() {
			continue
		}
		name := v.netRuntime()
		parts := strings.Split(name, ".")
		wrapper := filepath.Join(snapBinDir, fmt.Sprintf("containerd-shim-%s-%s", parts[len(parts)-2], parts[len(parts)-1]))
		script := fmt.Sprintf("#!/bin/sh\n# macvm-bench: the %s variant's shim config for nerdctl (no runtime options).\nexport MACVM_CONFIG=%s\nexec %s \"$@\"\n",
			v.info.Name, shellQuote(v.configPath), shellQuote(shim))
		if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
			return err
		}
	}
	before, err := natChains()
	if err != nil {
		// Without the list, the clean-up leaves the chains alone.
		logf("iptables-save -t nat: %v: empty CNI chains will be left after the run", err)
	}
	_, err = os.Stat("/sys/class/net/" + nerdctlBridge)
	b.nerdctl = &nerdctlSetup{
		natChainsBefore: before, chainsKnown: before != nil,
		bin: bin, binDir: snapBinDir,
		dataRoot:     filepath.Join(snapDir, "nerdctl"),
		cniPath:      filepath.Join(snapBinDir, "cni"),
		netConfPath:  filepath.Join(snapDir, "cni-net"),
		removeBridge: errors.Is(err, os.ErrNotExist),
	}
	return nil
}

// cleanupNerdctl deletes what nerdctl's networking leaves behind: the
// bridge and its isolation rules if this run made the bridge, and the
// empty per-container NAT chains. The rest (namespace, veth or tap, the
// chains' rules) goes with each `nerdctl run --rm`.
func (b *bench) cleanupNerdctl() {
	if b.nerdctl == nil {
		return
	}
	// The bridge plugin's DEL empties a container's NAT chain
	// (CNI-<hash>) but leaves it: delete the chains that appeared during
	// the run and are empty and unreferenced (iptables -X refuses others,
	// which are someone else's live containers').
	if now, err := natChains(); err == nil && b.nerdctl.chainsKnown {
		for _, c := range now {
			if !slices.Contains(b.nerdctl.natChainsBefore, c) {
				_ = exec.Command("iptables", "-w", "-t", "nat", "-X", c).Run()
			}
		}
	}
	if !b.nerdctl.removeBridge {
		return
	}
	if _, err := os.Stat("/sys/class/net/" + nerdctlBridge); err == nil {
		if out, err := exec.Command("ip", "link", "del", nerdctlBridge).CombinedOutput(); err != nil {
			logf("cleanup: ip link del %s: %v: %s", nerdctlBridge, err, out)
		}
	}
	// The firewall plugin's per-bridge isolation rules stay after its
	// DEL (they are the bridge's, not a container's).
	if err := deleteBridgeRules(nerdctlBridge); err != nil {
		logf("cleanup: iptables rules of %s: %v", nerdctlBridge, err)
	}
}

// natChains lists the nat table's CNI-<hash> chains.
func natChains() ([]string, error) {
	out, err := exec.Command("iptables-save", "-t", "nat").Output()
	if err != nil {
		return nil, err
	}
	return cniChains(string(out)), nil
}

// cniChains returns the chains of iptables-save text that CNI's bridge
// plugin names for a container's NAT rules: "CNI-" and 24 hex digits.
func cniChains(save string) []string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		name, ok := strings.CutPrefix(l, ":CNI-")
		if !ok {
			continue
		}
		name, _, _ = strings.Cut(name, " ")
		if len(name) == 24 && strings.Trim(name, "0123456789abcdef") == "" {
			out = append(out, "CNI-"+name)
		}
	}
	return out
}

// deleteBridgeRules deletes the filter table's rules that name bridge as
// their in- or out-interface.
func deleteBridgeRules(bridge string) error {
	out, err := exec.Command("iptables-save", "-t", "filter").Output()
	if err != nil {
		return err
	}
	for _, rule := range bridgeRules(string(out), bridge) {
		// iptables-save quotes like a shell, and its lines are iptables arguments.
		if b, err := exec.Command("sh", "-c", "iptables -t filter -D "+rule).CombinedOutput(); err != nil {
			return fmt.Errorf("iptables -D %s: %v: %s", rule, err, b)
		}
	}
	return nil
}

// bridgeRules returns the rules (without "-A") of iptables-save text whose
// -i or -o is bridge.
func bridgeRules(save, bridge string) []string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		rule, ok := strings.CutPrefix(l, "-A ")
		if !ok {
			continue
		}
		f := strings.Fields(rule)
		for i := 0; i+1 < len(f); i++ {
			if (f[i] == "-i" || f[i] == "-o") && f[i+1] == bridge {
				out = append(out, rule)
				break
			}
		}
	}
	return out
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// nerdctlDefaultNetwork has nerdctl write its default network's config
// (network "bridge": bridge nerdctl0, 10.4.0.0/24, portmap, firewall,
// tuning) into the run's private CNI config directory. nerdctl does so on
// first use, and refuses when the host already has an interface in
// 10.4.0.0/24 — which it has whenever another nerdctl on the host uses
// its default network, or an earlier run left nerdctl0. So it runs once in
// an empty network namespace (`compose config` is a command that makes the
// default network and starts nothing; containerd's socket is a file, so it
// is reachable from there), and the measured runs then attach to nerdctl0
// like any nerdctl sharing the host's default network.
func (b *bench) nerdctlDefaultNetwork(ctx context.Context) error {
	n := b.nerdctl
	compose := filepath.Join(n.dataRoot, "compose.yaml")
	if err := os.MkdirAll(n.dataRoot, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(compose, []byte("services:\n  bench:\n    image: "+harness.BusyboxImage+"\n"), 0o600); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	c := exec.CommandContext(ctx, n.bin, "--address", b.cd.Address, "--namespace", Namespace, "--data-root", n.dataRoot,
		"--cni-path", n.cniPath, "--cni-netconfpath", n.netConfPath, "compose", "-f", compose, "config")
	c.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	if out, err := c.CombinedOutput(); err != nil {
		return fmt.Errorf("nerdctl's default network config (nerdctl compose config in an empty network namespace): %w: %s", err, out)
	}
	ents, _ := os.ReadDir(n.netConfPath)
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join(n.netConfPath, e.Name())); err == nil && strings.Contains(string(b), `"`+nerdctlBridge+`"`) {
			return nil
		}
	}
	return fmt.Errorf("nerdctl wrote no config for its default network (%s) in %s", nerdctlBridge, n.netConfPath)
}

// nerdctlRun runs `nerdctl run --rm` of cmd for v on the default bridge,
// timed like ctr, and returns the container's id (from --cidfile).
func (b *bench) nerdctlRun(ctx context.Context, v *variant, cmd ...string) (*ctrRun, string, error) {
	ctx, cancel := context.WithTimeout(ctx, ctrTimeout)
	defer cancel()
	n := b.nerdctl
	cidFile := filepath.Join(n.dataRoot, fmt.Sprintf("cid-%d", b.nextSeq()))
	args := []string{"--address", b.cd.Address, "--namespace", Namespace, "--data-root", n.dataRoot,
		"--cni-path", n.cniPath, "--cni-netconfpath", n.netConfPath,
		"run", "--rm", "--pull", "never", "--network", "bridge", "--runtime", v.netRuntime(), "--cidfile", cidFile, harness.BusyboxImage}
	args = append(args, cmd...)
	c := exec.CommandContext(ctx, n.bin, args...)
	c.Env = append(os.Environ(), "PATH="+n.binDir+string(os.PathListSeparator)+os.Getenv("PATH"))
	r := &ctrRun{stdout: &timedWriter{}}
	c.Stdout = r.stdout
	c.Stderr = &r.stderr
	if err := os.MkdirAll(n.dataRoot, 0o700); err != nil {
		return nil, "", err
	}
	r.start = time.Now()
	err := c.Run()
	r.end = time.Now()
	idb, _ := os.ReadFile(cidFile)
	os.Remove(cidFile)
	id := strings.TrimSpace(string(idb))
	if err != nil {
		return r, id, fmt.Errorf("nerdctl run --runtime %s %s: %w: %s", v.netRuntime(), strings.Join(cmd, " "), err, strings.TrimSpace(r.stderr.String()))
	}
	if id == "" {
		return r, id, fmt.Errorf("nerdctl run --runtime %s: no container id in --cidfile", v.netRuntime())
	}
	return r, id, nil
}

// measureNet times `nerdctl run --rm` of `true` (wall) and of `echo`
// (first output) on nerdctl's default bridge network, the variants
// interleaved as for ctr. Warm-start variants first get a template for the
// tap NIC's key, and the pool variant a full pool of it.
func (b *bench) measureNet(ctx context.Context) error {
	if err := b.nerdctlDefaultNetwork(ctx); err != nil {
		return err
	}
	if err := b.netWarmUp(ctx); err != nil {
		return err
	}
	wall := b.res.metric("net.wall", GroupLatency, "`nerdctl run --rm` of `true` on nerdctl's default bridge network (wall)", "s")
	first := b.res.metric("net.first_output", GroupLatency, "`nerdctl run --rm` of `echo` on the bridge network: first output", "s")
	modes := map[string]map[string]int{}
	var ids []struct{ v, id string }
	for i := 0; i < b.cfg.mode.NetRuns; i++ {
		for _, v := range b.rotate(i) {
			r, id, err := b.nerdctlRun(ctx, v, "true")
			if err != nil {
				return err
			}
			wall.add(v.info.Name, r.wall().Seconds())
			ids = append(ids, struct{ v, id string }{v.info.Name, id})
			logf("net  %-14s %6.3fs", v.info.Name, r.wall().Seconds())
		}
		for _, v := range b.rotate(i + 1) {
			r, id, err := b.nerdctlRun(ctx, v, "echo", "hello")
			if err != nil {
				return err
			}
			t, _, _, head := r.stdout.snapshot()
			if strings.TrimSpace(head) != "hello" {
				return fmt.Errorf("%s: nerdctl run echo printed %q, want hello", v.info.Name, head)
			}
			first.add(v.info.Name, t.Sub(r.start).Seconds())
			ids = append(ids, struct{ v, id string }{v.info.Name, id})
			logf("net  %-14s echo first output %6.3fs, wall %6.3fs", v.info.Name, t.Sub(r.start).Seconds(), r.wall().Seconds())
		}
	}
	logTimes, err := scanStartPathFile(b.cd.LogPath)
	if err != nil {
		return err
	}
	for _, x := range ids {
		mode := "unreported"
		if lg := logTimes[x.id]; lg != nil && lg.Mode != "" {
			mode = lg.Mode
		}
		if modes[x.v] == nil {
			modes[x.v] = map[string]int{}
		}
		modes[x.v][mode]++
	}
	for _, v := range b.variants {
		if c := modes[v.info.Name]; c != nil && v.vm() {
			b.res.Notes = append(b.res.Notes, fmt.Sprintf("start modes of `%s`'s `nerdctl run --rm` VMs on the bridge network (shim log `start_mode`): %s", v.info.Name, formatCounts(c)))
		}
	}
	return nil
}

// netWarmUp gives each template variant a template for the bridge
// network's NIC key (the first networked run boots cold and starts the
// template builder) and fills the pool variant's pool for that key (a run
// that asks the pool for the key adds it), so the measurements see the
// steady state, as warmUp does for the NIC-less key.
func (b *bench) netWarmUp(ctx context.Context) error {
	for _, v := range b.variants {
		if v.templateDir == "" {
			continue
		}
		before := len(templateKeys(v.templateDir))
		if _, _, err := b.nerdctlRun(ctx, v, "true"); err != nil {
			return fmt.Errorf("network warm-up of %s: %w", v.info.Name, err)
		}
		// The NIC-less template (warmUp) and the tap NIC's.
		deadline := time.Now().Add(templateWait)
		for len(templateKeys(v.templateDir)) < 2 {
			if time.Now().After(deadline) {
				log, _ := os.ReadFile(filepath.Join(v.templateDir, "build.log"))
				return fmt.Errorf("network warm-up of %s: no template for the bridge NIC after %v; build log:\n%s", v.info.Name, templateWait, log)
			}
			if err := sleepCtx(ctx, 500*time.Millisecond); err != nil {
				return err
			}
		}
		logf("network warm-up: %s has its templates %v", v.info.Name, templateKeys(v.templateDir))
		if v.poolSize == 0 {
			continue
		}
		// A run with the NIC's template in place asks the pool for its
		// key, which adds the key; the first run did unless it made the
		// template itself.
		if before < 2 {
			if _, _, err := b.nerdctlRun(ctx, v, "true"); err != nil {
				return fmt.Errorf("network warm-up of %s: %w", v.info.Name, err)
			}
		}
		if err := b.waitPoolKeys(ctx, v, len(templateKeys(v.templateDir))); err != nil {
			return err
		}
	}
	return nil
}

// templateKeys lists the finished templates in dir (see hasTemplate).
func templateKeys(dir string) []string {
	var out []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") && exists(filepath.Join(dir, e.Name(), "manifest.json")) {
			out = append(out, e.Name())
		}
	}
	return out
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
