//go:build !linux

package network

import "github.com/macvm/macvm/pkg/vm"

// adoptable leaves nic as is: pooled VMs are QEMU-only (Linux).
func (u *UserNet) adoptable(nic vm.NIC) vm.NIC { return nic }
