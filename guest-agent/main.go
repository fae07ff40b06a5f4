// Command guest-agent is PID 1 in every macvm VM: it boots the guest and
// serves the host's agent protocol (see internal/run). Re-executed under a
// hidden argv[0], it is the per-process container helper instead.
package main

import (
	"os"
	"path/filepath"

	"github.com/macvm/macvm/guest-agent/internal/container"
	"github.com/macvm/macvm/guest-agent/internal/run"
)

func main() {
	if filepath.Base(os.Args[0]) == container.HelperArg0 {
		container.RunHelper() // never returns
	}
	os.Exit(run.Main())
}
