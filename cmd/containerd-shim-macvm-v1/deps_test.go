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

// TestNoGRPCInShim builds the shim's package list the way `make shim`
// does (hack/shim-modfile.sh: containerd's task API without its gRPC stubs)
// and checks that gRPC and the HTTP/TLS stack it drags in stay out: the
// shim serves ttrpc only, and their code cost every running shim ~3.8 MiB
// of RSS (docs/shim.md, "Memory").
func TestNoGRPCInShim(t *testing.T) {
	dir := t.TempDir()
	script := exec.Command("hack/shim-modfile.sh", dir)
	script.Dir = "../.."
	if out, err := script.CombinedOutput(); err != nil {
		t.Fatalf("hack/shim-modfile.sh: %v\n%s", err, out)
	}
	out, err := exec.Command("go", "list", "-modfile="+dir+"/go.mod", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := map[string]bool{}
	for _, p := range strings.Fields(string(out)) {
		deps[p] = true
	}
	if !deps["github.com/containerd/containerd/api/runtime/task/v3"] {
		t.Fatalf("the shim no longer links containerd's task API: is this test still needed?\n%s", out)
	}
	for _, banned := range []string{"google.golang.org/grpc", "net/http", "crypto/tls", "crypto/x509", "html/template", "text/template", "golang.org/x/net/trace"} {
		if deps[banned] {
			t.Errorf("the shim links %s", banned)
		}
	}
}
