//go:build !linux

package network

import (
	"fmt"

	"github.com/containerd/errdefs"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// Netns is Linux-only: network namespaces (and CNI) exist only there.
type Netns struct{}

// OpenNetns fails: there are no network namespaces on this platform.
func OpenNetns(path string) (*Netns, error) {
	return nil, fmt.Errorf("network namespace %s: namespaces are Linux-only: %w", path, errdefs.ErrNotImplemented)
}

func (n *Netns) NICs() []vm.NIC                              { return nil }
func (n *Netns) GuestConfig() *agent.ConfigureNetworkRequest { return nil }
func (n *Netns) Close() error                                { return nil }

// CreateNetns fails: there are no network namespaces on this platform.
func CreateNetns(path string) error {
	return fmt.Errorf("network namespace %s: namespaces are Linux-only: %w", path, errdefs.ErrNotImplemented)
}

// RemoveNetns has nothing to remove on this platform.
func RemoveNetns(string) error { return nil }
