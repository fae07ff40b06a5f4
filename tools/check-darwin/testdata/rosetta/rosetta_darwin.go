//go:build darwin

// Package rosetta uses an arm64-only vz API in a file built for every
// darwin architecture: correct on arm64, an error on amd64.
package rosetta

import vz "github.com/Code-Hex/vz/v3"

// Available reports whether Rosetta is installed.
func Available() bool {
	return vz.LinuxRosettaDirectoryShareAvailability() == vz.LinuxRosettaAvailabilityInstalled // arm64 only
}
