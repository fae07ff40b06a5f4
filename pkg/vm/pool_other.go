//go:build !linux

package vm

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
)

// RunPoolDaemon: the pool is QEMU-only.
func RunPoolDaemon(context.Context, string, *TemplateCache, PoolWarmFunc, *PoolJob, func(string, ...any)) error {
	return fmt.Errorf("the VM pool runs on Linux (QEMU) only: %w", errdefs.ErrNotImplemented)
}

// StopPool: there is no pool daemon off Linux.
func StopPool(string, time.Duration) error { return nil }
