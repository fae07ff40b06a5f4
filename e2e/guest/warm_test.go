package guest_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/macvm/macvm/pkg/guest"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// buildRandProbe builds testdata/randprobe (static) for the rootfs.
func buildRandProbe(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "randprobe")
	cmd := exec.Command("go", "build", "-o", out, "./testdata/randprobe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build randprobe: %v\n%s", err, b)
	}
	return out
}

type probeResult struct {
	urandom, getrandom string
	skew               time.Duration
}

// TestWarmStartClones builds a template, then starts two clones of it at
// once: each must see its own root filesystem, have its own random
// stream (after Reseed, as the shim does it) and the host's wall clock,
// and run a container end to end. The template must be unchanged.
func TestWarmStartClones(t *testing.T) {
	probe, err := os.ReadFile(buildRandProbe(t))
	if err != nil {
		t.Fatal(err)
	}
	var missed atomic.Int32
	cache := &vm.TemplateCache{
		Dir:    t.TempDir(),
		Ready:  guest.TemplateWarm,
		OnMiss: func(vm.Config) { missed.Add(1) },
		Logf:   t.Logf,
	}
	base := vmConfig(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	if err := cache.Build(ctx, base); err != nil {
		t.Fatalf("build template: %v", err)
	}
	t.Logf("template built in %v", time.Since(start))
	key, err := cache.Lookup(base)
	if err != nil {
		t.Fatalf("template not valid after build: %v", err)
	}
	memBefore, err := os.Stat(filepath.Join(cache.Dir, key, "memory"))
	if err != nil {
		t.Fatal(err)
	}

	var results [2]probeResult
	t.Run("clones", func(t *testing.T) {
		for i := range results {
			t.Run(strconv.Itoa(i), func(t *testing.T) {
				t.Parallel()
				cfg := vmConfig(t)
				cfg.Templates = cache
				rootfs := cfg.Shares[0].HostPath
				marker := fmt.Sprintf("clone-%d-%s", i, t.Name())
				if err := os.WriteFile(filepath.Join(rootfs, "marker"), []byte(marker), 0o644); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(rootfs, "bin", "randprobe"), probe, 0o755); err != nil {
					t.Fatal(err)
				}
				v := bootVMWith(t, &cfg)
				if mode := vm.StartModeOf(v.m); mode != vm.StartTemplate {
					t.Fatalf("start mode %q, want %q", mode, vm.StartTemplate)
				}
				t.Logf("clone %d: qemu start -> agent ready %v", i, v.boot)
				// What the shim does for every VM right after connecting.
				entropy := make([]byte, 64)
				rand.Read(entropy)
				if _, err := v.client.Reseed(rpcCtx(t), &agent.ReseedRequest{Entropy: entropy}); err != nil {
					t.Fatalf("Reseed: %v", err)
				}
				if _, err := v.client.Reseed(rpcCtx(t), &agent.ReseedRequest{Entropy: entropy[:8]}); err == nil {
					t.Errorf("Reseed with 8 bytes succeeded, want an invalid-argument error")
				}
				if _, err := v.client.SetTime(rpcCtx(t), &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil {
					t.Fatalf("SetTime: %v", err)
				}
				before := time.Now()
				out, errOut, status := v.run(t, "probe", defaultSpec("sh", "-c", "cat /marker; echo; randprobe"))
				after := time.Now()
				if status != 0 {
					t.Fatalf("status %d, stdout %q stderr %q", status, out, errOut)
				}
				lines := strings.Split(strings.TrimSpace(out), "\n")
				if len(lines) != 2 || lines[0] != marker {
					t.Fatalf("stdout %q: want the marker %q and a probe line", out, marker)
				}
				var r probeResult
				var now int64
				if _, err := fmt.Sscanf(lines[1], "urandom=%s getrandom=%s now=%d", &r.urandom, &r.getrandom, &now); err != nil {
					t.Fatalf("probe line %q: %v", lines[1], err)
				}
				guestNow := time.Unix(0, now)
				switch {
				case guestNow.Before(before.Add(-time.Second)):
					r.skew = guestNow.Sub(before)
				case guestNow.After(after.Add(time.Second)):
					r.skew = guestNow.Sub(after)
				}
				if r.skew != 0 {
					t.Errorf("guest clock %v is off the host's [%v, %v] by %v", guestNow, before, after, r.skew)
				}
				checkQEMUMemory(t, v.m.Pid(), 64)
				// The template was saved after a warm-up container
				// (guest.TemplateWarm): nothing of it is left in a
				// clone, so a container of its name can be made.
				if out, errOut, status := v.run(t, guest.WarmUpContainerID, defaultSpec("true")); status != 0 {
					t.Fatalf("container %s in a clone: status %d, stdout %q stderr %q", guest.WarmUpContainerID, status, out, errOut)
				}
				results[i] = r
			})
		}
	})
	if t.Failed() {
		return
	}
	if results[0].urandom == results[1].urandom {
		t.Errorf("both clones read the same /dev/urandom bytes %s", results[0].urandom)
	}
	if results[0].getrandom == results[1].getrandom {
		t.Errorf("both clones got the same getrandom bytes %s", results[0].getrandom)
	}
	if n := missed.Load(); n != 0 {
		t.Errorf("%d template misses, want 0", n)
	}
	memAfter, err := os.Stat(filepath.Join(cache.Dir, key, "memory"))
	if err != nil {
		t.Fatal(err)
	}
	if !memAfter.ModTime().Equal(memBefore.ModTime()) || memAfter.Size() != memBefore.Size() {
		t.Errorf("template memory changed by its clones: %v %d -> %v %d", memBefore.ModTime(), memBefore.Size(), memAfter.ModTime(), memAfter.Size())
	}
	if _, err := cache.Lookup(base); err != nil {
		t.Errorf("template no longer valid after its clones ran: %v", err)
	}
}
