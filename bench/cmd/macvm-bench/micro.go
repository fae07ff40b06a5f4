package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/macvm/macvm/e2e/harness"
)

// microPackage holds the transport's Go benchmarks (streams over a
// socketpair: throughput per window size, RPC round trip, stream open).
const microPackage = "./pkg/guest/transport"

// measureMicro runs the transport's Go benchmarks and keeps their figures.
func (b *bench) measureMicro(ctx context.Context) error {
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", ".", "-benchtime", b.cfg.mode.MicroBenchtime, "-count", "1", microPackage)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Env = os.Environ()
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	cmd.Dir = root
	if err := harness.RunCmd(cmd); err != nil {
		return fmt.Errorf("go test -bench %s: %v\n%s%s", microPackage, err, out.String(), errb.String())
	}
	rs := parseBench(out.String())
	if len(rs) == 0 {
		return fmt.Errorf("go test -bench %s printed no benchmark lines:\n%s", microPackage, out.String())
	}
	b.res.Micro = rs
	return nil
}

// parseBench extracts benchmark result lines ("BenchmarkX-2  100  123 ns/op  45.6 MB/s").
func parseBench(text string) []MicroResult {
	var out []MicroResult
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		iters, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			continue
		}
		r := MicroResult{Name: trimProcs(strings.TrimPrefix(f[0], "Benchmark")), Iters: iters}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			switch f[i+1] {
			case "ns/op":
				r.NsPerOp = v
			case "MB/s":
				r.MBPerS = v
			}
		}
		if r.NsPerOp > 0 {
			out = append(out, r)
		}
	}
	return out
}

// trimProcs drops go test's "-GOMAXPROCS" suffix.
func trimProcs(name string) string {
	if i := strings.LastIndexByte(name, '-'); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			return name[:i]
		}
	}
	return name
}
