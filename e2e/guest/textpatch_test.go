package guest_test

import (
	"context"
	"strings"
	"testing"
	"time"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// textPatchFlips is how many times TestKernelTextPatching turns a static
// key on and off: with one TCG thread per vCPU (QEMU's default) the guest
// hung within the first 100 flips in most runs; 500 take 10-25 s here.
const textPatchFlips = "500"

// TestKernelTextPatching makes a two-vCPU guest rewrite its kernel text
// while both vCPUs run it, the way a boot does when the agent creates the
// first cpuset or memory cgroup: one process flips the sched_schedstats
// static key (each flip live-patches every schedstat check in the
// scheduler with text_poke_bp: int3 first, then the new bytes, then the
// int3 removed) while two others keep both vCPUs scheduling. Under
// multi-threaded TCG a vCPU could keep executing a translation of the
// int3 after it was gone from memory, and the kernel's "int3 already
// removed, run the instruction again" path then looped forever (soft
// lockups, a VM that never answers; the intermittent boot hangs of CI).
// The VM must finish every flip and answer.
func TestKernelTextPatching(t *testing.T) {
	cfg := vmConfig(t)
	if cfg.CPUs < 2 {
		t.Fatalf("the race needs two vCPUs; the test VMs have %d", cfg.CPUs)
	}
	v := bootVMWith(t, &cfg)

	script := "(while :; do /bin/true; done) & (while :; do :; done) & " +
		"i=0; while [ $i -lt " + textPatchFlips + " ]; do " +
		"echo 1 > /proc/sys/kernel/sched_schedstats; echo 0 > /proc/sys/kernel/sched_schedstats; i=$((i+1)); done; " +
		"echo flips $i; kill %1 %2"
	spec := defaultSpec("sh", "-c", script)
	spec.Linux.ReadonlyPaths = nil // /proc/sys must be writable
	caps := spec.Process.Capabilities
	caps.Bounding = append(caps.Bounding, "CAP_SYS_ADMIN")
	caps.Effective = append(caps.Effective, "CAP_SYS_ADMIN")
	caps.Permitted = append(caps.Permitted, "CAP_SYS_ADMIN")

	p := v.create(t, "flipper", spec, false)
	start := time.Now()
	v.start(t, p)
	// Generous: the loop takes 10-25 s on a loaded machine, a hang is
	// forever.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	resp, err := v.client.WaitProcess(ctx, &agent.WaitProcessRequest{ContainerId: p.cid, ExecId: p.eid})
	if err != nil {
		t.Fatalf("the guest did not finish %s static key flips in %v: %v\nconsole:\n%s",
			textPatchFlips, time.Since(start).Round(time.Second), err, v.m.ConsoleTail(4096))
	}
	out := p.stdout.wait(t)
	if resp.ExitStatus != 0 || strings.TrimSpace(out) != "flips "+textPatchFlips {
		t.Fatalf("exit %d, stdout %q, stderr %q", resp.ExitStatus, out, p.stderr.wait(t))
	}
	t.Logf("%s flips of sched_schedstats with both vCPUs busy: %v", textPatchFlips, time.Since(start).Round(time.Millisecond))
	// The VM still answers.
	if out, _, st := v.run(t, "after", defaultSpec("echo", "alive")); st != 0 || out != "alive\n" {
		t.Fatalf("after the flips: exit %d, stdout %q", st, out)
	}
}
