package critest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// Outcome is one critest spec's result on one runtime handler.
type Outcome struct {
	// Name is the spec's full text (its containers' texts and its own, space-separated).
	Name string
	// State is ginkgo's: passed, failed, skipped, pending, panicked, timedout, interrupted, aborted.
	State string
	// Failure is the failure message (empty unless it failed).
	Failure string
}

// Run is one critest run.
type Run struct {
	Handler  string
	Duration time.Duration
	Specs    map[string]Outcome
	// Output is critest's own output (for failures of the run itself).
	Output []byte
	// Rerun lists the specs whose outcome comes from a later, focused run (Overlay).
	Rerun []string
}

// Count returns how many specs ended in state.
func (r *Run) Count(state string) int {
	n := 0
	for _, o := range r.Specs {
		if o.State == state {
			n++
		}
	}
	return n
}

// RunCritest runs the critest binary in binDir against the daemon with the given runtime handler. focus
// and skip are ginkgo regular expressions ("" for none). A critest that reports failed specs is not an
// error; one that produces no report is.
func RunCritest(ctx context.Context, d *harness.Containerd, handler, focus, skip string, timeout time.Duration) (*Run, error) {
	report := reportPath(d, handler)
	args := []string{
		"-runtime-endpoint", "unix://" + d.Address,
		"-image-endpoint", "unix://" + d.Address,
		"-runtime-handler", handler,
		"-ginkgo.json-report", report,
		"-ginkgo.timeout", timeout.String(),
		"-ginkgo.no-color",
	}
	if focus != "" {
		args = append(args, "-ginkgo.focus", focus)
	}
	if skip != "" {
		args = append(args, "-ginkgo.skip", skip)
	}
	cmd := exec.CommandContext(ctx, filepath.Join(d.BinDir(), "critest"), args...)
	// critest's test binary reads /etc/crictl.yaml (before flags are parsed) unless it finds none; run it
	// where the harness's crictl.yaml is, which it also searches, and pass the endpoints as flags.
	cmd.Dir = d.Dir
	cmd.WaitDelay = 10 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	runErr := harness.RunCmd(cmd)
	r := &Run{Handler: handler, Duration: time.Since(start), Output: out.Bytes(), Specs: map[string]Outcome{}}
	if _, err := os.Stat(report); err != nil {
		return r, fmt.Errorf("critest (%s) wrote no report (%v): %w\n%s", handler, runErr, err, tail(out.Bytes(), 4000))
	}
	loaded, err := LoadReport(report, handler)
	if err != nil {
		return r, err
	}
	r.Specs = loaded.Specs
	if len(r.Specs) == 0 {
		return r, fmt.Errorf("critest (%s) ran no spec (%v):\n%s", handler, runErr, tail(out.Bytes(), 4000))
	}
	return r, nil
}

// LoadReport reads a critest (ginkgo) JSON report of a run with handler; Duration is the suite's run time.
func LoadReport(path, handler string) (*Run, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var suites []struct {
		RunTime     time.Duration
		SpecReports []struct {
			ContainerHierarchyTexts []string
			LeafNodeText            string
			LeafNodeType            string
			State                   string
			Failure                 struct {
				Message string
			}
		}
	}
	if err := json.Unmarshal(b, &suites); err != nil {
		return nil, fmt.Errorf("critest report %s: %w", path, err)
	}
	r := &Run{Handler: handler, Specs: map[string]Outcome{}}
	for _, s := range suites {
		r.Duration += s.RunTime
		for _, sr := range s.SpecReports {
			if sr.LeafNodeType != "It" {
				continue // BeforeSuite/AfterSuite nodes
			}
			name := strings.Join(append(append([]string{}, sr.ContainerHierarchyTexts...), sr.LeafNodeText), " ")
			r.Specs[name] = Outcome{Name: name, State: sr.State, Failure: firstLine(sr.Failure.Message)}
		}
	}
	return r, nil
}

// Overlay replaces r's outcomes with those of a later run of some of the same specs (a focused rerun
// after a fix); specs the later run skipped keep their outcome. It records which specs it replaced.
func (r *Run) Overlay(later *Run) {
	for n, o := range later.Specs {
		if o.State == "skipped" {
			continue
		}
		r.Specs[n] = o
		r.Rerun = append(r.Rerun, n)
	}
	sort.Strings(r.Rerun)
}

// Names returns the spec names of r, sorted.
func (r *Run) Names() []string {
	var out []string
	for n := range r.Specs {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// reportPath is where RunCritest has critest write its ginkgo JSON report.
func reportPath(d *harness.Containerd, handler string) string {
	return filepath.Join(d.Dir, "critest-"+handler+".json")
}

// saveReport copies handler's report into dir (created if needed).
func saveReport(d *harness.Containerd, handler, dir string) error {
	b, err := os.ReadFile(reportPath(d, handler))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "critest-"+handler+".json"), b, 0o644)
}
