// Command macvm-bench measures the macvm runtime side by side with
// containerd's runc shim (io.containerd.runc.v2 with Debian's runc) on one
// private containerd, the same locally built busybox image and the same
// machine, in one run: `ctr run --rm` latency and its phases, the same on a
// CNI bridge network through nerdctl, exec latency,
// stdout and stdin throughput, memory per container, density, and the
// transport's Go micro-benchmarks. Every measurement alternates the runtimes
// (A, B, A, B ...) so that the noise of a shared machine hits both alike,
// and the report gives medians, spread and the ratio macvm/runc.
//
// It writes bench/results/DATE-MACHINE.md (and .json with every sample)
// and copies the Markdown to bench/results/latest.md. Run it through
// `make bench` (quick) or `make bench-full`; it needs root.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// mode fixes how many samples each measurement takes.
type mode struct {
	Name string
	// Runs is the number of `ctr run --rm` samples per runtime (and of the
	// first-output samples).
	Runs int
	// NetRuns is the number of networked `nerdctl run --rm` samples per
	// runtime, of `true` and of `echo` each.
	NetRuns int
	// Execs is the number of exec samples per runtime.
	Execs int
	// StreamMiB and Streams size the stdout/stdin throughput samples.
	StreamMiB, Streams int
	// Density is how many containers run at once in the density test, and
	// DensityRounds how often it is repeated.
	Density, DensityRounds int
	// MicroBenchtime is go test's -benchtime for the transport benchmarks.
	MicroBenchtime string
}

var modes = map[string]mode{
	"quick": {Name: "quick", Runs: 5, NetRuns: 3, Execs: 7, StreamMiB: 64, Streams: 3, Density: 10, DensityRounds: 1, MicroBenchtime: "200ms"},
	"full":  {Name: "full", Runs: 15, NetRuns: 10, Execs: 21, StreamMiB: 256, Streams: 5, Density: 10, DensityRounds: 2, MicroBenchtime: "1s"},
}

func main() {
	var (
		modeName = flag.String("mode", "quick", "quick (a few minutes) or full")
		binDir   = flag.String("bin", envOr(harness.EnvBinDir, "_output/bin"), "containerd, ctr and both shims")
		bootDir  = flag.String("boot", envOr(harness.EnvBootDir, "_output/boot"), "boot files of the default (Debian) kernel")
		minimal  = flag.String("boot-minimal", "_output/boot-minimal", "boot files of the minimal kernel; measured as a second macvm variant when present")
		outDir   = flag.String("out", "bench/results", "where the results go")
		only     = flag.String("only", "", "comma-separated measurements to run (run,output,net,exec,stream,memory,density,micro); default all")
		keep     = flag.Bool("keep", false, "keep containerd's log after the run")
		readme   = flag.String("readme", "", "also put the summary table into this README, between its bench markers")
		warm     = flag.Bool("warm", true, "also measure macvm started from a warm-start template (warm_start = \"template\") and from the pool (\"pool\") beside cold boots")
	)
	flag.Parse()
	m, ok := modes[*modeName]
	if !ok {
		fatalf("unknown -mode %q (quick or full)", *modeName)
	}
	if os.Geteuid() != 0 {
		fatalf("must run as root: it starts containerd, shims and VMs")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, config{
		mode: m, binDir: *binDir, bootDir: *bootDir, minimalDir: *minimal, outDir: *outDir,
		only: splitList(*only), keep: *keep, readme: *readme, warm: *warm,
	})
	if err != nil {
		fatalf("%v", err)
	}
	fmt.Printf("\nresults: %s\n", res)
}

type config struct {
	mode                        mode
	binDir, bootDir, minimalDir string
	outDir                      string
	only                        map[string]bool
	keep                        bool
	readme                      string
	// warm adds the warm-start variants (template and pool).
	warm bool
}

func (c config) wants(name string) bool { return len(c.only) == 0 || c.only[name] }

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func splitList(s string) map[string]bool {
	out := map[string]bool{}
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out[f] = true
		}
	}
	return out
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "macvm-bench: "+format+"\n", args...)
	os.Exit(1)
}

// logf prints progress with a time stamp relative to the start of the run.
var started = time.Now()

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
}
