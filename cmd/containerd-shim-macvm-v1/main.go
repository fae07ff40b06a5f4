// Command containerd-shim-macvm-v1 is containerd's runtime v2 shim for
// io.containerd.macvm.v1: every container runs in its own lightweight VM.
package main

import (
	"context"
	"os"

	"github.com/containerd/containerd/v2/pkg/shim"

	"github.com/macvm/macvm/pkg/service"
	_ "github.com/macvm/macvm/pkg/service/plugin"
)

func main() {
	// The shim also serves as its own detached warm-start template
	// builder (pkg/service/warm.go); containerd never passes this.
	if len(os.Args) == 2 && os.Args[1] == service.TemplateBuilderArg {
		os.Exit(service.RunTemplateBuilder(os.Stdin))
	}
	// ... and its warm-start pool daemon (pkg/service/pool.go).
	if len(os.Args) == 3 && os.Args[1] == service.PoolDaemonArg {
		os.Exit(service.RunPoolDaemon(os.Args[2], os.Stdin))
	}
	// ... and the tool that stops it (`make pool-stop`).
	if len(os.Args) == 3 && os.Args[1] == service.PoolStopArg {
		os.Exit(service.RunPoolStop(os.Args[2]))
	}
	// The shim reaps only its own children (the hypervisors, logging
	// drivers and hooks it starts and waits for): containerd's implicit
	// reaper would steal their exit statuses, and as a subreaper it would
	// collect orphans it never waits for.
	shim.RunShim(context.Background(), service.NewManager("io.containerd.macvm.v1"), func(c *shim.Config) {
		c.NoReaper = true
		c.NoSubreaper = true
	})
}
