package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoNetworkStackInShim keeps the user-space network stack out of the
// shim binary: gvisor-tap-vsock (through gopacket/layers' package init)
// cost every shim ~11 MiB of RSS; it belongs in macvm-usernet
// (pkg/network/userstack's doc).
func TestNoNetworkStackInShim(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/containers/gvisor-tap-vsock/", "github.com/google/gopacket", "gvisor.dev/gvisor/"} {
			if strings.HasPrefix(p, banned) {
				t.Errorf("the shim links %s (keep the network stack in macvm-usernet)", p)
			}
		}
	}
}
