//go:build darwin

// Package wrongvz holds deliberately wrong vz calls: check-darwin must
// report each of them (the test names the lines).
package wrongvz

import vz "github.com/Code-Hex/vz/v3"

// Configure passes the socket device in a slice of the concrete type,
// where vz wants its sealed interface type, and the CPU count as an int.
func Configure(kernel string, cpus int) (*vz.VirtualMachineConfiguration, error) {
	boot, err := vz.NewLinuxBootLoader(kernel)
	if err != nil {
		return nil, err
	}
	cfg, err := vz.NewVirtualMachineConfiguration(boot, cpus, 512<<20) // WRONG: cpus is int, vz wants uint
	if err != nil {
		return nil, err
	}
	sock, err := vz.NewVirtioSocketDeviceConfiguration()
	if err != nil {
		return nil, err
	}
	cfg.SetSocketDevicesVirtualMachineConfiguration([]*vz.VirtioSocketDeviceConfiguration{sock}) // WRONG: slice type
	return cfg, nil
}
