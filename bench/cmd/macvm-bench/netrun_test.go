package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/macvm/macvm/bench/internal/procmem"
	"github.com/macvm/macvm/e2e/harness"
)

// TestShimWrapper: each macvm variant gets a runtime name of its own for
// nerdctl, and the shim binary containerd resolves for it runs the real
// shim with the variant's config in MACVM_CONFIG and the arguments as given.
func TestShimWrapper(t *testing.T) {
	src, snap := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "nerdctl"), []byte("not run"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A stand-in shim that reports what it was started with.
	fake := "#!/bin/sh\necho \"config=$MACVM_CONFIG args=$*\"\n"
	if err := os.WriteFile(filepath.Join(snap, "containerd-shim-macvm-v1"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "it's macvm-pool.toml")
	b := &bench{variants: []*variant{
		{info: VariantInfo{Name: "runc"}, rt: harness.Runc()},
		{info: VariantInfo{Name: "macvm-pool"}, rt: harness.Macvm(), configPath: cfg},
	}}
	if err := b.setupNerdctl(src, snap, t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if got := b.variants[0].netRuntime(); got != harness.Runc().Name {
		t.Errorf("runc's runtime for nerdctl = %q, want %q", got, harness.Runc().Name)
	}
	name := b.variants[1].netRuntime()
	if name != "io.containerd.benchmacvmpool.v1" {
		t.Fatalf("macvm-pool's runtime for nerdctl = %q", name)
	}
	// containerd's name → binary rule: containerd-shim-<second last>-<last>.
	out, err := exec.Command(filepath.Join(snap, "containerd-shim-benchmacvmpool-v1"), "start", "-id", "x y").Output()
	if err != nil {
		t.Fatal(err)
	}
	if want := "config=" + cfg + " args=start -id x y\n"; string(out) != want {
		t.Errorf("wrapper ran the shim as %q, want %q", out, want)
	}
	if st, err := os.Stat(filepath.Join(snap, "nerdctl")); err != nil || st.Mode().Perm()&0o111 == 0 {
		t.Errorf("nerdctl not copied executable: %v %v", st, err)
	}
	if _, err := os.Stat(filepath.Join(snap, "containerd-shim-benchrunc-v1")); err == nil {
		t.Error("a wrapper for runc")
	}
}

// TestTCGCacheNotQEMU: a process without -accel tcg,tb-size has no
// translation cache to count (not an error).
func TestTCGCacheNotQEMU(t *testing.T) {
	u, err := tcgCache([]int{os.Getpid()})
	if err != nil || u != (procmem.Usage{}) {
		t.Errorf("tcgCache(self) = %+v, %v; want zero", u, err)
	}
	if _, err := tcgCache([]int{1 << 30}); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("tcgCache of a missing pid: %v, want not found", err)
	}
}

func TestBridgeRules(t *testing.T) {
	save := `*filter
:CNI-ISOLATION-STAGE-1 - [0:0]
-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD
-A CNI-ISOLATION-STAGE-1 -i nerdctl0 ! -o nerdctl0 -m comment --comment "CNI firewall plugin rules (ingressPolicy: same-bridge)" -j CNI-ISOLATION-STAGE-2
-A CNI-ISOLATION-STAGE-1 -i nerdctl01 ! -o nerdctl01 -j CNI-ISOLATION-STAGE-2
-A CNI-ISOLATION-STAGE-2 -o nerdctl0 -m comment --comment "CNI firewall plugin rules (ingressPolicy: same-bridge|isolated)" -j DROP
COMMIT
`
	got := bridgeRules(save, "nerdctl0")
	want := []string{
		`CNI-ISOLATION-STAGE-1 -i nerdctl0 ! -o nerdctl0 -m comment --comment "CNI firewall plugin rules (ingressPolicy: same-bridge)" -j CNI-ISOLATION-STAGE-2`,
		`CNI-ISOLATION-STAGE-2 -o nerdctl0 -m comment --comment "CNI firewall plugin rules (ingressPolicy: same-bridge|isolated)" -j DROP`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("bridgeRules = %q, want %q", got, want)
	}
}

func TestCNIChains(t *testing.T) {
	save := `*nat
:POSTROUTING ACCEPT [0:0]
:CNI-0f8d2086dd26d0eb03c17370 - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:CNI-DN-0f8d2086dd26d0eb03c17 - [0:0]
:CNI-0F8D2086DD26D0EB03C17370 - [0:0]
-A POSTROUTING -s 10.4.0.5/32 -j CNI-0f8d2086dd26d0eb03c17370
COMMIT
`
	got := cniChains(save)
	if len(got) != 1 || got[0] != "CNI-0f8d2086dd26d0eb03c17370" {
		t.Errorf("cniChains = %q, want only CNI-0f8d2086dd26d0eb03c17370", got)
	}
}
