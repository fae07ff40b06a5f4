// Command check-darwin type-checks this module's packages for macOS on any
// host. The Virtualization.framework backend is cgo with Objective-C, so a
// Linux machine cannot build it (no darwin C toolchain) and a plain cross
// build without cgo silently drops every vz file; CI would then never see
// a wrong vz call. Type-checking needs neither: `go list` resolves the
// darwin package graph without running cgo, and go/types with FakeImportC
// checks every Go file, including those that import "C".
//
// Usage:
//
//	check-darwin [-arch arm64,amd64] [-tests=true] [packages]   (default ./...)
//
// It prints one line per type error in this module's packages (errors in
// dependencies are not ours to fix and are ignored) and exits 1 if there
// were any. It does not compile or link the Objective-C side.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

func main() {
	arches := flag.String("arch", "arm64,amd64", "comma-separated darwin GOARCH values to check")
	tests := flag.Bool("tests", true, "also check _test.go files")
	dir := flag.String("C", ".", "directory inside the module to check")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: check-darwin [flags] [packages]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	patterns := flag.Args()
	if len(patterns) == 0 {
		patterns = []string{"./..."}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	failed := false
	for _, arch := range strings.Split(*arches, ",") {
		arch = strings.TrimSpace(arch)
		if arch == "" {
			continue
		}
		start := time.Now()
		res, err := Check(ctx, Options{Dir: *dir, GOARCH: arch, Tests: *tests, Patterns: patterns})
		if err != nil {
			fmt.Fprintf(os.Stderr, "check-darwin: darwin/%s: %v\n", arch, err)
			os.Exit(2)
		}
		for _, e := range res.Errors {
			fmt.Fprintf(os.Stderr, "darwin/%s: %s\n", arch, e)
		}
		if len(res.Errors) > 0 {
			failed = true
		}
		fmt.Printf("check-darwin: darwin/%s: %d packages of this module checked (%d in the graph), %d errors, %.1fs\n",
			arch, res.Checked, res.Graph, len(res.Errors), time.Since(start).Seconds())
	}
	if failed {
		os.Exit(1)
	}
}
