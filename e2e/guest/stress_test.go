package guest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// stressOpTimeout bounds one operation of the stress test (an exec from
// ExecProcess to DeleteProcess). A healthy exec takes well under a second
// even on a loaded TCG host; a stall is what this is after.
const stressOpTimeout = 45 * time.Second

// stressDuration is how long TestStressExecs runs: short in the normal
// suite, MACVM_STRESS_DURATION (a Go duration, e.g. 10m) for a soak.
func stressDuration(t *testing.T) time.Duration {
	t.Helper()
	s := os.Getenv("MACVM_STRESS_DURATION")
	if s == "" {
		return 15 * time.Second
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("MACVM_STRESS_DURATION=%q: %v", s, err)
	}
	return d
}

// probe is a container sharing the agent's PID namespace whose init watches
// the data share for a trigger file and then, without any new exec (which a
// stalled agent may not serve), sends the agent SIGQUIT (goroutine dump on
// the console) and copies every process's /proc/<pid>/stat to the share.
const probeScript = `while :; do
  if [ -e /vol/dump ]; then
    rm -f /vol/dump
    kill -QUIT 1
    for f in /proc/[0-9]*/stat; do cat $f; done > /vol/stat.tmp 2>/dev/null
    mv /vol/stat.tmp /vol/stat.out
  fi
  sleep 0.2
done`

// evidence gathers what a stalled operation leaves: the agent's goroutines
// and every process's state in the guest, and the console tail.
func (v *testVM) evidence(t *testing.T, cid string) string {
	var b strings.Builder
	statOut := filepath.Join(v.data, "stat.out")
	os.Remove(statOut)
	os.WriteFile(filepath.Join(v.data, "dump"), nil, 0o644)
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(statOut); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st, err := os.ReadFile(statOut); err == nil {
		fmt.Fprintf(&b, "guest /proc/*/stat:\n%s\n", st)
	} else {
		fmt.Fprintf(&b, "the probe did not answer in 15s (its `sleep 0.2` stalled too?): %v\n", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if resp, err := v.client.Pids(ctx, &agent.PidsRequest{ContainerId: cid}); err == nil {
		fmt.Fprintf(&b, "Pids(%s): %v\n", cid, resp.Processes)
	} else {
		fmt.Fprintf(&b, "Pids(%s): %v\n", cid, err)
	}
	// Let the dump reach the console.
	time.Sleep(2 * time.Second)
	fmt.Fprintf(&b, "console tail:\n%s", v.m.ConsoleTail(256<<10))
	return b.String()
}

// stressOps runs processes in one container through the agent API without
// the test's Fatal (they run on many goroutines).
type stressOps struct {
	v   *testVM
	cid string
	n   atomic.Int64
}

// run execs args, starts it, waits for it and deletes it; it returns the
// exit status and stdout.
func (s *stressOps) run(ctx context.Context, args []string, kill bool) (uint32, string, error) {
	eid := fmt.Sprintf("s%d", s.n.Add(1))
	outName := fmt.Sprintf("stress-%s-%s-out", s.cid, eid)
	out, err := s.v.client.OpenStream(outName)
	if err != nil {
		return 0, "", fmt.Errorf("%s: open stream: %w", eid, err)
	}
	defer out.Close()
	col := collect(out)
	proc, _ := json.Marshal(&specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}})
	step := func(what string, err error) error {
		if err != nil {
			return fmt.Errorf("%s %v: %s: %w", eid, args, what, err)
		}
		return nil
	}
	if _, err := s.v.client.ExecProcess(ctx, &agent.ExecProcessRequest{ContainerId: s.cid, ExecId: eid, Process: proc, Stdio: &agent.Stdio{Stdout: outName}}); err != nil {
		return 0, "", step("ExecProcess", err)
	}
	if _, err := s.v.client.StartProcess(ctx, &agent.StartProcessRequest{ContainerId: s.cid, ExecId: eid}); err != nil {
		return 0, "", step("StartProcess", err)
	}
	if kill {
		if _, err := s.v.client.SignalProcess(ctx, &agent.SignalProcessRequest{ContainerId: s.cid, ExecId: eid, Signal: uint32(syscall.SIGKILL)}); err != nil {
			return 0, "", step("SignalProcess", err)
		}
	}
	w, err := s.v.client.WaitProcess(ctx, &agent.WaitProcessRequest{ContainerId: s.cid, ExecId: eid})
	if err != nil {
		return 0, "", step("WaitProcess", err)
	}
	select {
	case <-col.done:
	case <-ctx.Done():
		return 0, "", step("stdout EOF", ctx.Err())
	}
	if _, err := s.v.client.DeleteProcess(ctx, &agent.DeleteProcessRequest{ContainerId: s.cid, ExecId: eid}); err != nil {
		return 0, "", step("DeleteProcess", err)
	}
	return w.ExitStatus, col.String(), nil
}

// startProbe creates the evidence probe (see probeScript).
func (v *testVM) startProbe(t *testing.T) {
	spec := withoutNamespace(defaultSpec("sh", "-c", probeScript), specs.PIDNamespace)
	spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/vol", Type: "9p", Source: dataTag, Options: []string{"trans=virtio", "version=9p2000.L", "msize=512000"}})
	v.start(t, v.create(t, "probe", spec, false))
}

// TestStressExecs runs short execs (sleep 0.1, true, echo) from several
// goroutines with Kill, Pids and Stats alongside, every operation bounded:
// the guest stall seen about once in 15 VMs on a loaded host (a `sleep 1`
// that never returned, then Exec and Kill hanging while Pids answered).
// On a stall it reports the agent's goroutines, the guest's process states
// and the console.
//
// It first runs testExecIntoPausedContainer on the same VM (one boot).
func TestStressExecs(t *testing.T) {
	v := bootVM(t)
	v.startProbe(t)
	// The evidence a stall would report is there: the agent survives
	// SIGQUIT and dumps its goroutines, and the probe reads the guest's
	// process states.
	if !t.Run("evidence", func(t *testing.T) {
		ev := v.evidence(t, "probe")
		for _, want := range []string{"guest /proc/*/stat:\n1 (init) ", "SIGQUIT: goroutine dump", "reaper.(*Reaper).Run", "goroutine dump ends"} {
			if !strings.Contains(ev, want) {
				t.Errorf("evidence lacks %q:\n%s", want, ev)
			}
		}
		if _, err := v.client.Pids(rpcCtx(t), &agent.PidsRequest{ContainerId: "probe"}); err != nil {
			t.Fatalf("the agent is not serving after SIGQUIT: %v", err)
		}
	}) {
		return
	}
	if !t.Run("exec into a paused container", func(t *testing.T) { testExecIntoPausedContainer(t, v) }) {
		return
	}
	v.start(t, v.create(t, "work", defaultSpec("sleep", "3600"), false))
	ops := &stressOps{v: v, cid: "work"}
	dur := stressDuration(t)

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex // guards failure and count
		failure error
		count   = map[string]int{}
	)
	fail := func(err error) {
		mu.Lock()
		if failure == nil {
			failure = err
		}
		mu.Unlock()
		cancel()
	}
	done := func(kind string) {
		mu.Lock()
		count[kind]++
		mu.Unlock()
	}
	loop := func(kind string, op func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				octx, ocancel := context.WithTimeout(context.Background(), stressOpTimeout)
				err := op(octx)
				timedOut := octx.Err() != nil
				ocancel()
				if err != nil {
					if timedOut {
						err = fmt.Errorf("%s stalled for %v: %w", kind, stressOpTimeout, err)
					}
					fail(err)
					return
				}
				done(kind)
			}
		}()
	}
	want := func(args []string, status uint32, out string, kill bool) func(context.Context) error {
		return func(ctx context.Context) error {
			st, got, err := ops.run(ctx, args, kill)
			if err != nil {
				return err
			}
			if st != status || got != out {
				return fmt.Errorf("%v: status %d, stdout %q; want %d, %q", args, st, got, status, out)
			}
			return nil
		}
	}
	loop("sleep", want([]string{"sleep", "0.1"}, 0, "", false))
	loop("true", want([]string{"true"}, 0, "", false))
	loop("echo", want([]string{"echo", "hello"}, 0, "hello\n", false))
	loop("kill", want([]string{"sleep", "30"}, 137, "", true))
	loop("pids+stats", func(ctx context.Context) error {
		if _, err := v.client.Pids(ctx, &agent.PidsRequest{ContainerId: "work"}); err != nil {
			return fmt.Errorf("Pids: %w", err)
		}
		if _, err := v.client.Stats(ctx, &agent.StatsRequest{ContainerId: "work"}); err != nil {
			return fmt.Errorf("Stats: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
		return nil
	})
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if failure != nil {
		t.Fatalf("%v (after %v)\n%s", failure, count, v.evidence(t, "work"))
	}
	t.Logf("%v in %v: %v", dur, time.Since(v.m.BootStarted()), count)
	for _, k := range []string{"sleep", "true", "echo", "kill"} {
		if count[k] == 0 {
			t.Errorf("no %s operation completed in %v", k, dur)
		}
	}
}

// testExecIntoPausedContainer: an exec into a frozen container cannot fork
// until the thaw (the helper is cloned into the frozen cgroup). That must
// hold up only that exec: the agent's reaper used to hold its lock across
// the fork, so no exit anywhere in the guest was dispatched (a `sleep` that
// never returned) and every later Exec hung, which is the stall seen under
// load.
func testExecIntoPausedContainer(t *testing.T, v *testVM) {
	v.start(t, v.create(t, "frozen", defaultSpec("sleep", "3600"), false))
	v.start(t, v.create(t, "other", defaultSpec("sleep", "3600"), false))
	frozen := &stressOps{v: v, cid: "frozen"}
	other := &stressOps{v: v, cid: "other"}

	if _, err := v.client.Pause(rpcCtx(t), &agent.PauseRequest{ContainerId: "frozen"}); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	type result struct {
		status uint32
		out    string
		err    error
	}
	blocked := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		st, out, err := frozen.run(ctx, []string{"echo", "thawed"}, false)
		blocked <- result{st, out, err}
	}()
	// Give that exec time to reach its fork.
	time.Sleep(2 * time.Second)
	select {
	case r := <-blocked:
		t.Logf("exec into the paused container finished before the thaw: %+v", r)
	default:
	}

	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			v.client.Resume(rpcCtx(t), &agent.ResumeRequest{ContainerId: "frozen"})
		}
	}
	defer thaw()
	for i, args := range [][]string{{"sleep", "0.2"}, {"echo", "still served"}} {
		ctx, cancel := context.WithTimeout(context.Background(), stressOpTimeout)
		st, out, err := other.run(ctx, args, false)
		cancel()
		if err != nil {
			ev := v.evidence(t, "other")
			thaw()
			t.Fatalf("exec %d %v in another container while one is paused: %v\n%s", i, args, err, ev)
		}
		if st != 0 || (args[0] == "echo" && out != "still served\n") {
			t.Fatalf("%v: status %d, stdout %q", args, st, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), stressOpTimeout)
	st, _, err := other.run(ctx, []string{"sleep", "30"}, true)
	cancel()
	if err != nil || st != 137 {
		ev := v.evidence(t, "other")
		thaw()
		t.Fatalf("kill of an exec while another container is paused: status %d, %v\n%s", st, err, ev)
	}

	thaw()
	select {
	case r := <-blocked:
		if r.err != nil || r.status != 0 || r.out != "thawed\n" {
			t.Fatalf("exec into the thawed container: status %d, stdout %q, %v", r.status, r.out, r.err)
		}
	case <-time.After(stressOpTimeout):
		t.Fatalf("exec into the container did not finish after the thaw\n%s", v.evidence(t, "frozen"))
	}
}
