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
	// EnvReports names a directory to keep critest's JSON reports in (critest-HANDLER.json), so a
	// comparison can be rendered again, or overlaid with a focused rerun, without the hour-long run.
	EnvReports = "MACVM_CRITEST_REPORTS"
	// EnvFrom renders the comparison from kept reports instead of running critest: a comma-separated list
	// of EnvReports directories, each later one a focused rerun overlaid on the earlier (Run.Overlay).
	EnvFrom = "MACVM_CRITEST_FROM"
	// EnvTimeout bounds one handler's run (a Go duration, default 38m): the whole suite on macvm takes
	// about an hour on the loaded 2-core machine, so `make critest` raises it.
	EnvTimeout = "MACVM_CRITEST_TIMEOUT"
)

// defaultFocus is the subset `make test` runs when EnvFocus is unset (the whole suite takes ~9 minutes on
// runc alone here, and far longer on VMs under TCG): pod and container basic operations, a pod of several
// containers (network, logs, exec), exec streaming, and three seccomp specs (RuntimeDefault, a localhost profile,
// one that blocks sethostname: the filters the guest agent compiles and installs).
const defaultFocus = `PodSandbox runtime should support basic operations|Container runtime should support basic operations|` +
	`Multiple Containers|Streaming runtime should support streaming interfaces runtime should support exec|` +
	`SeccompProfilePath.*(seccomp default on the container|localhost profile on the container|blocks setting hostname)`

// TestCritest runs critest with the runc handler, then with the macvm handler, on one private containerd,
// and fails when a spec passes on runc but not on macvm without an entry in Differences.
func TestCritest(t *testing.T) {
	if from := os.Getenv(EnvFrom); from != "" {
		compareKept(t, strings.Split(from, ","))
		return
	}
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
	perHandler := 38 * time.Minute
	if v := os.Getenv(EnvTimeout); v != "" {
		if perHandler, err = time.ParseDuration(v); err != nil {
			t.Fatalf("%s=%q: %v", EnvTimeout, v, err)
		}
	}
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
		rctx, cancel := context.WithTimeout(context.Background(), perHandler+2*time.Minute)
		r, err := RunCritest(rctx, d, h, focus, skip, perHandler)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if dir := os.Getenv(EnvReports); dir != "" {
			if err := saveReport(d, h, dir); err != nil {
				t.Errorf("keeping the %s report: %v", h, err)
			}
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
	report(t, runs[0], runs[1], focus, skip)
}

// compareKept compares the runs kept in dirs (EnvReports), each later directory overlaid on the first.
func compareKept(t *testing.T, dirs []string) {
	focus := os.Getenv(EnvFocus)
	var runs []*Run
	for _, h := range []string{harness.CRIRuncHandler, harness.CRIMacvmHandler} {
		var r *Run
		for _, dir := range dirs {
			l, err := LoadReport(filepath.Join(dir, "critest-"+h+".json"), h)
			if err != nil {
				t.Fatal(err)
			}
			if r == nil {
				r = l
			} else {
				r.Overlay(l)
			}
		}
		t.Logf("critest %s (kept): %d specs, %d passed, %d rerun", h, len(r.Specs), r.Count("passed"), len(r.Rerun))
		runs = append(runs, r)
	}
	report(t, runs[0], runs[1], focus, os.Getenv(EnvSkip))
}

// report compares runc with macvm, writes the comparison to EnvDoc if set, and fails on an unexplained
// difference.
func report(t *testing.T, runc, macvm *Run, focus, skip string) {
	c := Compare(runc, macvm, focus, skip)
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
