package critest

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// Differences explains, one line each, why a critest spec that passes with runc does not pass with
// macvm. A difference found by a run and missing here fails the comparison; an entry here that no run
// shows is reported as stale.
var Differences = map[string]string{
	"[k8s.io] Security Context NamespaceOption runtime should support HostIpc is true": "a container cannot join the " +
		"node's IPC namespace across the VM boundary: a hostIPC pod gets the VM's own, so the segment critest makes on the " +
		"host with ipcmk is not in the container's `ipcs -m` (docs/kubernetes.md, Limits)",
	"[k8s.io] Security Context NamespaceOption runtime should support HostNetwork is true": "a container cannot join " +
		"the node's network namespace across the VM boundary: a hostNetwork pod's VM has a NIC on the shim's user-space " +
		"NAT, so the port critest listens on in the host's namespace is not in the container's port list",
	"[k8s.io] Streaming runtime should support streaming interfaces runtime should support portforward in host network": "" +
		"the same: a hostNetwork pod's server listens in the VM, not on the node's loopback that containerd forwards to",
	"[k8s.io] Streaming runtime should support streaming interfaces runtime should support portforward [Conformance]": "" +
		"containerd's CRI forwards a port by dialing localhost inside the pod's network namespace on the host; with " +
		"macvm the pod's interface is carried into the VM and the server listens on the guest's loopback, which the " +
		"host-side namespace cannot reach (kubectl port-forward is not supported; the pod IP is reachable)",
	"[k8s.io] Container Mount Propagation runtime should support mount propagation mount with 'rshared' should support propagation from host to container and vice versa": "" +
		"a mount made inside the container is a mount in the VM's kernel and cannot appear on the host (bind sources " +
		"cross as a shared filesystem, files only); host to container works",
	"[k8s.io] Container Mount Readonly runtime should support readonly mounts should support non-recursive readonly mounts": "" +
		"the mount semantics pass (the volume's top is read-only, the tmpfs below it writable), but the spec's cleanup " +
		"cannot remove its tmpfs mount point on the host while the container runs (EBUSY): the pod share binds the " +
		"volume's source on the host for the VM's 9p server, where runc's bind lives in the container's mount namespace",
	"[k8s.io] Container Mount Readonly runtime should support readonly mounts should support recursive readonly mounts": "" +
		"the same: the mount semantics pass (the tmpfs below the volume's top is read-only too), the spec's cleanup " +
		"cannot remove its tmpfs mount point on the host while the container runs (EBUSY)",
}

// Known says, one line each, why a spec fails on runc on this machine too: a limit of the harness or
// the machine, not of a runtime. The comparison prints it next to the spec.
var Known = map[string]string{
	"[k8s.io] Image Manager public image with digest should be pulled and removed [Conformance]": "the image is pinned " +
		"by the upstream manifest's digest, which a locally rebuilt image cannot have",
	"[k8s.io] Security Context bucket runtime should support MaskedPaths": "the test image's shell is Debian's static " +
		"busybox, built as a standalone shell: `sh -c ls` runs the ls applet inside sh instead of executing the masked " +
		"/bin/ls, so nothing is denied (upstream's busybox image executes it)",
	"[k8s.io] Networking runtime should support networking runtime should support port mapping with host port and container port [Conformance]": "" +
		"the harness's bridge network has no portmap plugin (its iptables rules would outlive a killed test)",
}

// Comparison is the result of a runc run and a macvm run of the same specs.
type Comparison struct {
	Runc, Macvm *Run
	// Focus and Skip are the ginkgo expressions both runs used.
	Focus, Skip string
	// Regressions pass on runc and not on macvm; Unexplained are those without an entry in Differences.
	Regressions, Unexplained []string
	// Gains pass on macvm and not on runc.
	Gains []string
}

// Compare compares two runs of the same specs.
func Compare(runc, macvm *Run, focus, skip string) Comparison {
	c := Comparison{Runc: runc, Macvm: macvm, Focus: focus, Skip: skip}
	for _, n := range runc.Names() {
		r, m := runc.Specs[n], macvm.Specs[n]
		if r.State == "passed" && m.State != "passed" {
			c.Regressions = append(c.Regressions, n)
			if _, ok := Differences[n]; !ok {
				c.Unexplained = append(c.Unexplained, n)
			}
		}
	}
	for _, n := range macvm.Names() {
		if macvm.Specs[n].State == "passed" && runc.Specs[n].State != "passed" {
			c.Gains = append(c.Gains, n)
		}
	}
	return c
}

// Markdown renders the comparison as docs/critest.md.
func (c Comparison) Markdown(when time.Time) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# critest: runc vs macvm\n\n")
	fmt.Fprintf(&b, "Written by e2e/critest (`make critest`, or `make test-critest` for a focused subset) on %s: cri-tools' critest v1.34.0 against containerd v2.4.2's CRI\n", when.UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&b, "plugin on this project's machine (2 cores, QEMU under TCG, no KVM), once with `-runtime-handler runc`\n")
	fmt.Fprintf(&b, "(Debian's runc 1.1.5, host cgroup v1) and once with `-runtime-handler macvm`. Images come from a local\n")
	fmt.Fprintf(&b, "registry (see e2e/critest); pods get the harness's CNI bridge network, which has no portmap plugin.\n\n")
	if c.Focus != "" || c.Skip != "" {
		fmt.Fprintf(&b, "Specs selected: focus `%s`, skip `%s`.\n\n", c.Focus, c.Skip)
	}
	for _, r := range []*Run{c.Runc, c.Macvm} {
		if len(r.Rerun) > 0 {
			fmt.Fprintf(&b, "On %s, %d specs come from a later focused rerun (after a fix): %s.\n\n", r.Handler, len(r.Rerun),
				"`"+strings.Join(r.Rerun, "`, `")+"`")
		}
	}
	fmt.Fprintf(&b, "| runtime | specs | passed | failed | skipped | time |\n|---|---|---|---|---|---|\n")
	for _, r := range []*Run{c.Runc, c.Macvm} {
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %v |\n", r.Handler, len(r.Specs), r.Count("passed"),
			len(r.Specs)-r.Count("passed")-r.Count("skipped")-r.Count("pending"), r.Count("skipped"), r.Duration.Round(time.Second))
	}
	fmt.Fprintf(&b, "\n## Pass on runc, not on macvm\n\n")
	if len(c.Regressions) == 0 {
		fmt.Fprintf(&b, "None.\n")
	}
	for _, n := range c.Regressions {
		reason := Differences[n]
		if reason == "" {
			reason = "UNEXPLAINED: " + c.Macvm.Specs[n].Failure
		}
		fmt.Fprintf(&b, "- `%s` (%s): %s\n", n, c.Macvm.Specs[n].State, reason)
	}
	fmt.Fprintf(&b, "\n## Pass on macvm, not on runc\n\n")
	if len(c.Gains) == 0 {
		fmt.Fprintf(&b, "None.\n")
	}
	for _, n := range c.Gains {
		fmt.Fprintf(&b, "- `%s`: runc %s: %s\n", n, c.Runc.Specs[n].State, c.Runc.Specs[n].Failure)
	}
	fmt.Fprintf(&b, "\n## Fail on both\n\n")
	var both []string
	for _, n := range c.Runc.Names() {
		r, m := c.Runc.Specs[n], c.Macvm.Specs[n]
		if r.State != "passed" && r.State != "skipped" && m.State != "passed" {
			both = append(both, n)
		}
	}
	sort.Strings(both)
	if len(both) == 0 {
		fmt.Fprintf(&b, "None.\n")
	}
	for _, n := range both {
		if why := Known[n]; why != "" {
			fmt.Fprintf(&b, "- `%s`: %s (runc: %s)\n", n, why, c.Runc.Specs[n].Failure)
			continue
		}
		fmt.Fprintf(&b, "- `%s`: runc: %s\n", n, c.Runc.Specs[n].Failure)
	}
	fmt.Fprintf(&b, "\n## Running it\n\n"+
		"`make test-critest` (part of `make test`) runs a focused subset on both handlers; `make critest` runs the whole\n"+
		"suite (times in the table above; each macvm pod is a VM booted under TCG), keeps critest's JSON reports in\n"+
		"`_output/critest`, and rewrites this file. The two readonly-volume specs that fail on macvm leave their\n"+
		"`/tmp/test<pod id>` directory behind (critest gives up on it at the EBUSY). After a fix, rerun the affected specs with a focus\n"+
		"(`MACVM_CRITEST_FOCUS=... MACVM_CRITEST_REPORTS=DIR2`) and render the overlay without the long run:\n"+
		"`MACVM_CRITEST_FROM=$PWD/_output/critest,DIR2 MACVM_CRITEST_FOCUS= MACVM_CRITEST_DOC=$PWD/docs/critest.md go test -run TestCritest ./e2e/critest/`\n"+
		"(absolute paths: go test runs in the package directory).\n")
	return b.String()
}
