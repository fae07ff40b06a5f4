package service

import (
	"context"

	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// ConfigureNetwork records the call; the real configuration is tested in
// guest-agent/internal/network and end to end in e2e/network.
func (a *fakeAgent) ConfigureNetwork(context.Context, *agent.ConfigureNetworkRequest) (*emptypb.Empty, error) {
	a.record("ConfigureNetwork")
	return &emptypb.Empty{}, nil
}
