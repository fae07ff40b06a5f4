package guest

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/protobuf/types/known/emptypb"
)

// TemplateReady is vm.TemplateCache's Ready for VMs running this agent:
// it connects on a template VM's agent channel and waits until the agent
// answers and has loaded its kernel modules, so the saved template is a
// guest at rest that every clone resumes without repeating its boot. The
// returned release closes the connection (after the save: closing first
// would leave the guest's session winding down inside the template).
func TemplateReady(ctx context.Context, conn net.Conn) (func(), error) {
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
			return func() { c.Close() }, nil
		}
		select {
		case <-ctx.Done():
			c.Close()
			return nil, fmt.Errorf("template agent: modules not loaded: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
