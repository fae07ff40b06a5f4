package service

import (
	"context"
	"time"

	"github.com/containerd/log"
)

// timed starts timing one step of a container's start or teardown and
// returns the function that ends it: it logs the step and its duration at
// debug level, so a slow start can be taken apart from the shim's log
// alone (the benchmark reads the same lines).
func timed(ctx context.Context, id, step string) func() {
	start := time.Now()
	return func() {
		log.G(ctx).WithField("container_id", id).WithField("step", step).
			WithField("took", time.Since(start)).Debug("start path step")
	}
}
