package service

import (
	"context"
	"fmt"
	"net"

	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/macvm/macvm/guest-agent/internal/network"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// SetNetwork gives the service the configurator ConfigureNetwork uses; an
// agent that is not PID 1 of a VM (tests on the host) has none, so it never
// touches the host's network.
func (s *Service) SetNetwork(n *network.Configurator) { s.network = n }

func (s *Service) ConfigureNetwork(ctx context.Context, req *agent.ConfigureNetworkRequest) (*emptypb.Empty, error) {
	if s.network == nil {
		return empty(fmt.Errorf("this agent does not manage a network (not PID 1 of a VM): %w", errdefs.ErrNotImplemented))
	}
	cfg, err := networkConfig(req)
	if err != nil {
		return empty(err)
	}
	return empty(s.network.Apply(ctx, cfg))
}

// networkConfig converts the request, rejecting malformed MACs here so the
// configurator only sees parsed values.
func networkConfig(req *agent.ConfigureNetworkRequest) (network.Config, error) {
	var cfg network.Config
	mac := func(what, s string) (net.HardwareAddr, error) {
		if s == "" {
			return nil, nil
		}
		hw, err := net.ParseMAC(s)
		if err != nil {
			return nil, fmt.Errorf("%s %q is not a MAC address: %w", what, s, errdefs.ErrInvalidArgument)
		}
		return hw, nil
	}
	for _, i := range req.Interfaces {
		dev, err := mac("device_mac", i.DeviceMac)
		if err != nil {
			return cfg, err
		}
		hw, err := mac("mac", i.Mac)
		if err != nil {
			return cfg, err
		}
		cfg.Interfaces = append(cfg.Interfaces, network.Interface{
			DeviceMAC: dev, Index: int(i.Index), Name: i.Name, MAC: hw, MTU: int(i.Mtu), Addresses: i.Addresses,
		})
	}
	for _, r := range req.Routes {
		cfg.Routes = append(cfg.Routes, network.Route{
			Destination: r.Destination, Gateway: r.Gateway, Device: r.Device, Source: r.Source, Metric: int(r.Metric),
		})
	}
	for _, n := range req.Neighbours {
		hw, err := mac("neighbour mac", n.Mac)
		if err != nil {
			return cfg, err
		}
		if hw == nil {
			return cfg, fmt.Errorf("neighbour %s has no MAC: %w", n.Ip, errdefs.ErrInvalidArgument)
		}
		cfg.Neighbours = append(cfg.Neighbours, network.Neighbour{IP: n.Ip, MAC: hw, Device: n.Device})
	}
	return cfg, nil
}
