package critest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// Environment of TestCritest.
const (
	// EnvFocus and EnvSkip are ginkgo regular expressions selecting critest's specs; `make test` runs a
	// focused subset, `make critest` the whole suite (EnvFocus empty, set explicitly).
	EnvFocus = "MACVM_CRITEST_FOCUS"
	EnvSkip  = "MACVM_CRITEST_SKIP"
	// EnvDoc names a file to write the comparison to (docs/critest.md).
	EnvDoc = "MACVM_CRITEST_DOC"
	// EnvHandlers narrows the handlers run (default "runc,macvm"); the comparison needs both.
	EnvHandlers = "MACVM_CRITEST_HANDLERS"
)

// defaultFocus is the subset `make test` runs when EnvFocus is unset (the whole suite takes ~9 minutes on
// runc alone here, and far longer on VMs under TCG): pod and container basic operations, a pod of several
// containers (network, logs, exec), and exec streaming.
const defaultFocus = `PodSandbox runtime should support basic operations|Container runtime should support basic operations|` +
	`Multiple Containers|Streaming runtime should support streaming interfaces runtime should support exec`

// TestCritest runs critest with the runc handler, then with the macvm handler, on one private containerd,
// and fails when a spec passes on runc but not on macvm without an entry in Differences.
func TestCritest(t *testing.T) {
	paths, err := harness.PathsFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"critest", "registry", "crictl", "containerd-shim-macvm-v1", "containerd-shim-runc-v2", "cni/bridge", "cni/host-local", "cni/loopback"} {
		if fi, err := os.Stat(filepath.Join(paths.BinDir, b)); err != nil || fi.Mode()&0o111 == 0 {
			t.Fatalf("%s missing from %s (run `make shim containerd cri-tools cni`)", b, paths.BinDir)
		}
	}
	focus, ok := os.LookupEnv(EnvFocus)
	if !ok {
		focus = defaultFocus
	}
	skip := os.Getenv(EnvSkip)
	snap, err := os.MkdirTemp("", "mvm-snap-")
	if err != nil {
		t.Fatal(err)
	}
	paths, release, err := paths.Snapshot(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer release()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	regDir, err := os.MkdirTemp("", "mvm-reg-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(regDir)
	reg, err := StartRegistry(ctx, paths.BinDir, regDir)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Stop()

	d, err := harness.Start(ctx, harness.Options{Paths: paths, CRI: true, Logf: t.Logf,
		CRIConfig: harness.CRIConfig{RegistryHostsDir: reg.HostsDir}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			t.Logf("containerd log tail:\n%s", d.LogTail(8000))
		}
		// Through CRI first, so CNI tears the pods' networks down (veths) before containerd stops.
		cctx, ccancel := context.WithTimeout(context.Background(), 5*time.Minute)
		if res, err := d.Crictl(cctx, "rmp", "--all", "--force"); err != nil || res.ExitCode != 0 {
			t.Errorf("crictl rmp --all --force: %v %v", res, err)
		}
		ccancel()
		if err := d.Cleanup(context.Background()); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	}()
	if err := d.ImportImage(ctx, harness.CRINamespace, harness.PauseImageSpec()); err != nil {
		t.Fatal(err)
	}
	pushStart := time.Now()
	if err := reg.Push(ctx, d, harness.CritestImages()); err != nil {
		t.Fatal(err)
	}
	t.Logf("critest images pushed to %s in %v", reg.Addr, time.Since(pushStart).Round(time.Millisecond))

	handlers := []string{harness.CRIRuncHandler, harness.CRIMacvmHandler}
	if v := os.Getenv(EnvHandlers); v != "" {
		handlers = strings.Split(v, ",")
	}
	var runs []*Run
	for _, h := range handlers {
		rctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
		r, err := RunCritest(rctx, d, h, focus, skip, 38*time.Minute)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("critest %s: %d specs, %d passed, %d skipped in %v", h, len(r.Specs), r.Count("passed"), r.Count("skipped"), r.Duration.Round(time.Second))
		for _, n := range r.Names() {
			if o := r.Specs[n]; o.State != "passed" && o.State != "skipped" {
				t.Logf("  %s %s: %s", o.State, n, o.Failure)
			}
		}
		runs = append(runs, r)
	}
	if len(runs) != 2 {
		t.Fatalf("%s=%q: no comparison without both handlers", EnvHandlers, os.Getenv(EnvHandlers))
	}
	if runs[0].Count("passed") == 0 {
		t.Fatalf("no critest spec passes on runc: the harness, not the runtime, is broken\n%s", tail(runs[0].Output, 6000))
	}
	c := Compare(runs[0], runs[1], focus, skip)
	if doc := os.Getenv(EnvDoc); doc != "" {
		if err := os.WriteFile(doc, []byte(c.Markdown(time.Now())), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.Unexplained) > 0 {
		t.Errorf("%d critest specs pass on runc but not on macvm, with no reason in Differences:\n%s",
			len(c.Unexplained), strings.Join(c.Unexplained, "\n"))
	}
}
