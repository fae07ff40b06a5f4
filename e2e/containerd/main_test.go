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

var (
	// paths is what the tests use: a snapshot of built, the build outputs.
	paths, built harness.Paths
	runtimes     []harness.Runtime
)

func TestMain(m *testing.M) {
	var err error
	if paths, err = harness.PathsFromEnv(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: e2e/containerd: %v\n", err)
		os.Exit(1)
	}
	if runtimes, err = harness.RuntimesFromEnv(); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: e2e/containerd: %v\n", err)
		os.Exit(1)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "FAIL: e2e/containerd: must run as root (it runs containerd)")
		os.Exit(1)
	}
	os.Exit(runWithSnapshot(m))
}

// runWithSnapshot runs the tests on a private copy of the shims and boot files (see Paths.Snapshot),
// while missing-file errors still name the build outputs.
func runWithSnapshot(m *testing.M) int {
	built = paths
	if rt := os.Getenv(envVictim); rt != "" {
		// Reuse the parent's snapshot, which outlives this process on purpose.
		victim(rt)
	}
	dir, err := os.MkdirTemp("", "mvm-snap-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: e2e/containerd: %v\n", err)
		return 1
	}
	var release func()
	if paths, release, err = paths.Snapshot(dir); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: e2e/containerd: snapshot of the build outputs: %v\n", err)
		return 1
	}
	defer release()
	return m.Run()
}

// forEachRuntime runs f as one subtest per selected runtime; vmOnly scenarios only make sense in a VM.
func forEachRuntime(t *testing.T, vmOnly bool, f func(t *testing.T, rt harness.Runtime)) {
	t.Helper()
	ran := false
	for _, rt := range runtimes {
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
	return daemonWith(t, rt, harness.Options{Paths: paths})
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
			logVMConsoles(t, d)
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
	p := filepath.Join(paths.BinDir, rt.Shim)
	fi, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("runtime %s needs %s in %s (run `make shim containerd`)", rt.Name, rt.Shim, built.BinDir)
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

// logVMConsoles prints the tail of every VM console log still in the daemon's bundles (the shim keeps
// them under BUNDLE/vm/), which is where a guest that hangs or panics says why.
func logVMConsoles(t *testing.T, d *harness.Containerd) {
	logs, _ := filepath.Glob(filepath.Join(d.State, "io.containerd.runtime.v2.task", "*", "*", "vm", "*.log"))
	for _, l := range logs {
		b, err := os.ReadFile(l)
		if err != nil || len(b) == 0 {
			continue
		}
		if len(b) > 3000 {
			b = b[len(b)-3000:]
		}
		t.Logf("%s:\n%s", l, b)
	}
}
