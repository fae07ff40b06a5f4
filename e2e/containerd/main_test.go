// Package containerd_test drives a real containerd, through ctr and containerd's Go client, against the
// macvm shim, with runc (io.containerd.runc.v2) as the known-good reference for every scenario.
//
// It needs root, the containerd binaries (`make containerd`), the shim (`make shim`) and the boot files
// (`make boot`): `make test-e2e` sets MACVM_BIN_DIR and MACVM_BOOT_DIR. Without them the tests fail
// rather than skip, so a CI run can never pass by testing nothing. MACVM_E2E_RUNTIMES=runc (or macvm)
// narrows the runtimes.
package containerd_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// suite holds the build outputs and runtimes the scenarios run with (set up by TestMain).
var suite harness.Suite

func TestMain(m *testing.M) {
	if rt := os.Getenv(envVictim); rt != "" {
		// Act as TestHarnessGuardian's victim, on the parent's snapshot (which outlives this process on purpose).
		p, err := harness.PathsFromEnv()
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: e2e/containerd: %v\n", err)
			os.Exit(1)
		}
		suite.Paths = p
		victim(rt)
	}
	os.Exit(harness.RunSuite(m, "e2e/containerd", &suite))
}

// forEachRuntime runs f as one subtest per selected runtime; vmOnly scenarios only make sense in a VM.
func forEachRuntime(t *testing.T, vmOnly bool, f func(t *testing.T, rt harness.Runtime)) {
	t.Helper()
	ran := false
	for _, rt := range suite.Runtimes {
		if vmOnly && !rt.VM {
			continue
		}
		ran = true
		t.Run(rt.Short, func(t *testing.T) { f(t, rt) })
	}
	if !ran {
		t.Fatalf("%s selects no runtime this scenario applies to", harness.EnvRuntimes)
	}
}

// daemon starts a private containerd with the busybox image imported, and registers its cleanup, which
// fails the test if anything the test started (shim, VM, container process, mount, shim socket)
// survives deleting every container and stopping containerd.
func daemon(t *testing.T, rt harness.Runtime) *harness.Containerd {
	t.Helper()
	return daemonWith(t, rt, harness.Options{Paths: suite.Paths})
}

// daemonWith is daemon with options (Debug and Logf are filled in) and
// importFlags added to `ctr images import`.
func daemonWith(t *testing.T, rt harness.Runtime, opts harness.Options, importFlags ...string) *harness.Containerd {
	t.Helper()
	if err := checkShim(rt); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	opts.Debug = os.Getenv("MACVM_E2E_DEBUG") != ""
	opts.Logf = t.Logf
	d, err := harness.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("containerd log tail:\n%s", d.LogTail(8000))
			harness.LogVMConsoles(t, d)
		}
		if err := d.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := d.ImportBusybox(ctx, importFlags...); err != nil {
		t.Fatal(err)
	}
	return d
}

func checkShim(rt harness.Runtime) error {
	p := filepath.Join(suite.Paths.BinDir, rt.Shim)
	fi, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("runtime %s needs %s in %s (run `make shim containerd`)", rt.Name, rt.Shim, suite.Built.BinDir)
	}
	if fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", p)
	}
	return nil
}

// ctx returns a context bounded for one scenario step; VMs boot under TCG here, so steps get minutes.
func ctx(t *testing.T, d time.Duration) context.Context {
	c, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return c
}
