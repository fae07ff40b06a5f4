package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Suite is what an end-to-end test package sets up once in its TestMain: the build outputs, the private
// snapshot of them the tests run on, and the runtimes selected by MACVM_E2E_RUNTIMES.
type Suite struct {
	// Paths is what the tests use: a snapshot of Built (see Paths.Snapshot).
	Paths Paths
	// Built are the build outputs the snapshot was taken from; error messages name them, since that is
	// where `make` puts fixed binaries.
	Built Paths
	// Runtimes are the runtimes the scenarios run on.
	Runtimes []Runtime
}

// RunSuite is the body of an e2e package's TestMain: it reads the environment into s, checks that the
// process runs as root, runs m on a private snapshot of the build outputs and returns the exit code.
// Missing outputs make it fail rather than skip, so a CI run can never pass by testing nothing. name
// (e.g. "e2e/cri") prefixes its error messages.
func RunSuite(m *testing.M, name string, s *Suite) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "FAIL: %s: %s\n", name, fmt.Sprintf(format, args...))
		return 1
	}
	var err error
	if s.Built, err = PathsFromEnv(); err != nil {
		return fail("%v", err)
	}
	if s.Runtimes, err = RuntimesFromEnv(); err != nil {
		return fail("%v", err)
	}
	if os.Geteuid() != 0 {
		return fail("must run as root (it runs containerd)")
	}
	dir, err := os.MkdirTemp("", "mvm-snap-")
	if err != nil {
		return fail("%v", err)
	}
	var release func()
	if s.Paths, release, err = s.Built.Snapshot(dir); err != nil {
		return fail("snapshot of the build outputs: %v", err)
	}
	defer release()
	return m.Run()
}

// LogVMConsoles logs the tail of every VM console log still in d's bundles (the shim keeps them under
// BUNDLE/vm/), which is where a guest that hangs or panics says why.
func LogVMConsoles(t testing.TB, d *Containerd) {
	t.Helper()
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
