package guest

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// TemplateReady is vm.TemplateCache's Ready for VMs running this agent:
// it connects on a template VM's agent channel and waits until the agent
// answers and has loaded its kernel modules, so the saved template is a
// guest at rest that every clone resumes without repeating its boot. The
// returned release closes the connection (after the save: closing first
// would leave the guest's session winding down inside the template).
func TemplateReady(ctx context.Context, conn net.Conn) (func(), error) {
	c, err := settled(ctx, conn)
	if err != nil {
		return nil, err
	}
	return func() { c.Close() }, nil
}

// PoolWarm is the warm-start pool daemon's warm-up of a pooled VM running
// this agent (vm.PoolDaemon.Warm): as TemplateReady, then the shares of
// shareTags (the pod share) are mounted in the guest, and a throw-away
// container goes through a create and a delete (warmUp). A template cannot
// hold a mounted 9p share (QEMU refuses to migrate it), but a pooled VM is
// never migrated again and its share directory is fixed: the first
// container's create then skips the mount. A failure discards the VM (the
// daemon retries, then leaves the key: shims start template clones).
func PoolWarm(ctx context.Context, conn net.Conn, shareTags []string) (func(), error) {
	c, err := settled(ctx, conn)
	if err != nil {
		return nil, err
	}
	if len(shareTags) > 0 {
		if _, err := c.PrepareShares(ctx, &agent.PrepareSharesRequest{Tags: shareTags}); err != nil {
			c.Close()
			return nil, fmt.Errorf("pooled VM: mount its shares: %w", err)
		}
	}
	if err := warmUp(ctx, c); err != nil {
		c.Close()
		return nil, fmt.Errorf("pooled VM: %w", err)
	}
	return func() { c.Close() }, nil
}

// settled connects to the agent on conn and waits until it has loaded its
// modules and its spare helper is idle (Info.modules_loaded).
func settled(ctx context.Context, conn net.Conn) (*Client, error) {
	c, err := NewClient(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("connect to the template's agent: %w", err)
	}
	for {
		info, err := c.Info(ctx, &emptypb.Empty{})
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("template agent Info: %w", err)
		}
		if info.GetModulesLoaded() {
			return c, nil
		}
		select {
		case <-ctx.Done():
			c.Close()
			return nil, fmt.Errorf("template agent: modules not loaded: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TemplateWarm is what the shim's template builder waits for: TemplateReady
// plus the pool's warm-up (warmUp: Reseed, SetTime and a throw-away
// container created and deleted, its helper started afresh so the spare
// stays idle) before the save. QEMU's translation cache is not saved, but
// the guest's state is: the agent's heap and its decoders' type caches,
// the kernel's slabs and caches for cgroups, namespaces and mounts. A
// clone's first CreateContainer RPC is ~14% shorter (docs/warm-start.md,
// "Building a template"); the whole `ctr run` gains little. Nothing of
// the warm-up container is left: it is deleted before the save, and the
// clones reseed.
func TemplateWarm(ctx context.Context, conn net.Conn) (func(), error) {
	c, err := settled(ctx, conn)
	if err != nil {
		return nil, err
	}
	if err := warmUp(ctx, c); err != nil {
		c.Close()
		return nil, fmt.Errorf("template VM: %w", err)
	}
	return func() { c.Close() }, nil
}
