//go:build darwin

// Package goodvz is correct vz code: check-darwin must report nothing on it.
package goodvz

import vz "github.com/Code-Hex/vz/v3"

// Configure builds a configuration the way pkg/vm does.
func Configure(kernel string) (*vz.VirtualMachineConfiguration, error) {
	boot, err := vz.NewLinuxBootLoader(kernel, vz.WithCommandLine("console=hvc0"))
	if err != nil {
		return nil, err
	}
	cfg, err := vz.NewVirtualMachineConfiguration(boot, 2, 512<<20)
	if err != nil {
		return nil, err
	}
	sock, err := vz.NewVirtioSocketDeviceConfiguration()
	if err != nil {
		return nil, err
	}
	cfg.SetSocketDevicesVirtualMachineConfiguration([]vz.SocketDeviceConfiguration{sock})
	return cfg, nil
}
