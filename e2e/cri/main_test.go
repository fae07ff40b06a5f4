// Package cri_test drives containerd's CRI plugin through crictl, the way the kubelet drives it, against
// the macvm runtime handler, with runc as the known-good reference for every scenario: pods of several
// containers, exec/logs/stats, stop and removal, OOM reporting.
//
// It needs root, containerd (`make containerd`), crictl (`make cri-tools`), the CNI plugins
// (`make cni`), the shim and the boot files: `make test-cri` sets MACVM_BIN_DIR and MACVM_BOOT_DIR.
// Without them the tests fail rather than skip. MACVM_E2E_RUNTIMES=runc (or macvm) narrows the runtimes.
package cri_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// suite holds the build outputs and runtimes the scenarios run with (set up by TestMain).
var suite harness.Suite

func TestMain(m *testing.M) { os.Exit(harness.RunSuite(m, "e2e/cri", &suite)) }

// forEachRuntime runs f as one subtest per selected runtime.
func forEachRuntime(t *testing.T, f func(t *testing.T, rt harness.Runtime)) {
	t.Helper()
	if len(suite.Runtimes) == 0 {
		t.Fatalf("%s selects no runtime", harness.EnvRuntimes)
	}
	for _, rt := range suite.Runtimes {
		t.Run(rt.Short, func(t *testing.T) { f(t, rt) })
	}
}

// handler is the CRI runtime handler (crictl runp --runtime) of rt.
func handler(rt harness.Runtime) string {
	if rt.VM {
		return harness.CRIMacvmHandler
	}
	return harness.CRIRuncHandler
}

// daemon starts a private containerd with CRI, the pause and busybox images imported into CRI's
// namespace, and registers its cleanup: every pod is removed through CRI, then the harness checks that
// nothing the test started (shim, VM, container process, mount, socket) survives.
func daemon(t *testing.T, rt harness.Runtime, cri harness.CRIConfig) *harness.Containerd {
	t.Helper()
	return daemonWith(t, rt, harness.Options{CRIConfig: cri})
}

// daemonWith is daemon with more of the harness's options (e.g. WarmStart); CRI, the paths and the
// logging are set here.
func daemonWith(t *testing.T, rt harness.Runtime, opts harness.Options) *harness.Containerd {
	t.Helper()
	for _, b := range []string{rt.Shim, "crictl", "cni/bridge", "cni/host-local", "cni/loopback"} {
		if fi, err := os.Stat(filepath.Join(suite.Paths.BinDir, b)); err != nil || fi.Mode()&0o111 == 0 {
			t.Fatalf("%s missing from %s (run `make shim containerd cri-tools cni`)", b, suite.Built.BinDir)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	opts.Paths, opts.CRI = suite.Paths, true
	opts.Debug, opts.Logf = os.Getenv("MACVM_E2E_DEBUG") != "", t.Logf
	d, err := harness.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("containerd log tail:\n%s", d.LogTail(8000))
			harness.LogVMConsoles(t, d)
		}
		cctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		// Through CRI first, as the kubelet would, so CRI's own state (netns, logs) is released too.
		if res, err := d.Crictl(cctx, "rmp", "--all", "--force"); err != nil || res.ExitCode != 0 {
			t.Errorf("crictl rmp --all --force: %v %v", res, err)
		}
		if err := d.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := d.ImportCRIImages(ctx); err != nil {
		t.Fatal(err)
	}
	return d
}

// ctx returns a context bounded for one scenario step; VMs boot under TCG here, so steps get minutes.
func ctx(t *testing.T, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}
