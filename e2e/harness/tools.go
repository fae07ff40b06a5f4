package harness

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
)

// The test image's programs that Debian's static busybox lacks (ipcmk, ipcs, ipcrm, pgrep: the CRI tests
// and critest run them in containers; pause: the pause image's process) come from e2e/cmd/e2etools, built here from this repository, static,
// and hard-linked under each name in /usr/bin.

const (
	// toolsPackage is the multi-call binary's package, relative to the module root.
	toolsPackage = "./e2e/cmd/e2etools"
	// toolsPath is where the image holds it.
	toolsPath = "usr/bin/e2etools"
)

// ToolNames are the programs e2etools provides in the image (all in /usr/bin).
var ToolNames = []string{"ipcmk", "ipcrm", "ipcs", "pause", "pgrep"}

// tools caches the built binary for the process: every image the harness builds carries it.
var tools struct {
	once sync.Once
	bin  []byte
	err  error
}

// e2eTools returns the static e2etools binary for the image's architecture (runtime.GOARCH), building
// it on first use (the go build cache makes later processes' builds quick).
func e2eTools() ([]byte, error) {
	tools.once.Do(func() { tools.bin, tools.err = buildTools() })
	return tools.bin, tools.err
}

func buildTools() ([]byte, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	dir, err := os.MkdirTemp("", "mvm-e2etools-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "e2etools")
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags", "-s -w", "-o", out, toolsPackage)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := RunCmd(cmd); err != nil {
		return nil, fmt.Errorf("building %s for the test image: %w: %s", toolsPackage, err, log.Bytes())
	}
	return os.ReadFile(out)
}

// moduleRoot finds this repository's root (the go.mod of github.com/macvm/macvm) above the working
// directory: tests run in their package's directory, commands such as mkbusybox from the root.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && strings.HasPrefix(string(b), "module github.com/macvm/macvm\n") {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("building the test image's tools: no github.com/macvm/macvm go.mod above %s", dir)
		}
	}
}
