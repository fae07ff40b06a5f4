package guest_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// TestGuestAgent shares one VM across subtests: a boot under TCG costs
// seconds, a container in a running VM a fraction of that.
func TestGuestAgent(t *testing.T) {
	v := bootVM(t)
	t.Logf("boot time (qemu start -> agent ready): %v", v.boot)
	info, err := v.client.Info(rpcCtx(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("agent %s, protocol %d, kernel %s, %d cpus, %d MiB, cgroup controllers %v",
		info.AgentVersion, info.ProtocolVersion, info.KernelRelease, info.Cpus, info.MemoryBytes>>20, info.CgroupControllers)
	for _, l := range strings.Split(v.m.ConsoleTail(8192), "\n") {
		if strings.Contains(l, "macvm-agent") {
			t.Logf("console: %s", l)
		}
	}
	if info.ProtocolVersion != 1 {
		t.Errorf("protocol version %d, want 1", info.ProtocolVersion)
	}

	t.Run("stdout stderr and exit code", func(t *testing.T) {
		out, errOut, status := v.run(t, "exit3", defaultSpec("sh", "-c", "echo out; echo err >&2; exit 3"))
		if out != "out\n" || errOut != "err\n" || status != 3 {
			t.Fatalf("got stdout %q stderr %q status %d; want %q %q 3", out, errOut, status, "out\n", "err\n")
		}
	})

	t.Run("container view", func(t *testing.T) {
		// The hostname, PID 1, a private devpts, the masked paths and the
		// dropped capabilities are what the spec asks for.
		script := `hostname; echo pid=$$; ls /dev/pts; cat /proc/kcore | wc -c; grep CapEff /proc/self/status; ` +
			`touch /proc/sys/x 2>/dev/null || echo ro-ok; ip link 2>/dev/null | grep -c LOOPBACK,UP`
		out, errOut, status := v.run(t, "view", defaultSpec("sh", "-c", script))
		want := "e2e\npid=1\nptmx\n0\nCapEff:\t00000000a80425fb\nro-ok\n1\n"
		if out != want || status != 0 {
			t.Fatalf("got stdout %q (stderr %q) status %d; want %q status 0", out, errOut, status, want)
		}
	})

	t.Run("cgroup2 favors dynamic moves", func(t *testing.T) {
		// The agent remounts the hierarchy with favordynmods (a container's
		// create moves its helper between cgroups); the container's own
		// cgroup2 mount shows the hierarchy's flags.
		out, errOut, status := v.run(t, "cgflags", defaultSpec("sh", "-c", "grep ' /sys/fs/cgroup ' /proc/self/mountinfo"))
		if status != 0 || !strings.Contains(out, "nsdelegate") || !strings.Contains(out, "favordynmods") {
			t.Fatalf("cgroup mount %q (stderr %q, status %d), want nsdelegate and favordynmods", out, errOut, status)
		}
	})

	t.Run("user groups umask rlimits", func(t *testing.T) {
		spec := defaultSpec("sh", "-c", "id; umask; ulimit -n; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; touch /tmp/f; stat -c %a /tmp/f")
		umask := uint32(0o077)
		spec.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{2000, 3000}, Umask: &umask}
		spec.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 512, Soft: 256}}
		out, errOut, status := v.run(t, "user", spec)
		want := "uid=1000 gid=1000 groups=2000,3000\n0077\n256\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\n600\n"
		if out != want || status != 0 {
			t.Fatalf("got stdout %q (stderr %q) status %d; want %q", out, errOut, status, want)
		}
	})

	t.Run("update resources", func(t *testing.T) {
		p := v.create(t, "update", defaultSpec("sh", "-c", "read x; cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/memory.max"), true)
		v.start(t, p)
		pids, mem := int64(42), int64(64<<20)
		b, _ := json.Marshal(&specs.LinuxResources{Pids: &specs.LinuxPids{Limit: &pids}, Memory: &specs.LinuxMemory{Limit: &mem}})
		if _, err := v.client.UpdateResources(rpcCtx(t), &agent.UpdateResourcesRequest{ContainerId: p.cid, Resources: b}); err != nil {
			t.Fatal(err)
		}
		p.stdin.Write([]byte("go\n"))
		if st := v.wait(t, p); st != 0 {
			t.Fatalf("exited %d: %q", st, p.stderr.wait(t))
		}
		if out := p.stdout.wait(t); out != "42\n67108864\n" {
			t.Fatalf("stdout %q, want the updated pids.max and memory.max", out)
		}
	})

	t.Run("set time", func(t *testing.T) {
		future := time.Date(2031, 7, 1, 12, 0, 0, 0, time.UTC)
		if _, err := v.client.SetTime(rpcCtx(t), &agent.SetTimeRequest{Time: timestamppb.New(future)}); err != nil {
			t.Fatal(err)
		}
		out, _, _ := v.run(t, "time", defaultSpec("date", "-u", "+%Y-%m"))
		if _, err := v.client.SetTime(rpcCtx(t), &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil {
			t.Fatal(err)
		}
		if out != "2031-07\n" {
			t.Fatalf("date printed %q after SetTime(2031-07-01)", out)
		}
	})

	t.Run("9p volumes", func(t *testing.T) {
		// A share mounted by two containers at once (a 9p device admits a
		// single mount: the agent mounts it once and binds it), read-only in
		// one, plus a single file bound from below the agent's share root.
		os.WriteFile(filepath.Join(v.data, "one.txt"), []byte("one\n"), 0o644)
		ninep := []string{"trans=virtio", "version=9p2000.L", "msize=512000"}
		rw := defaultSpec("sh", "-c", "read x; echo written > /vol/new.txt; cat /vol/one.txt")
		rw.Mounts = append(rw.Mounts, specs.Mount{Destination: "/vol", Type: "9p", Source: dataTag, Options: ninep})
		p := v.create(t, "vol-rw", rw, true)
		v.start(t, p)
		ro := defaultSpec("sh", "-c", "cat /vol/one.txt /file.txt; echo x > /vol/y 2>/dev/null || echo read-only")
		ro.Mounts = append(ro.Mounts,
			specs.Mount{Destination: "/vol", Type: "9p", Source: dataTag, Options: append([]string{"ro"}, ninep...)},
			specs.Mount{Destination: "/file.txt", Type: "bind", Source: "/run/macvm/shares/" + dataTag + "/one.txt", Options: []string{"rbind", "ro"}})
		out, errOut, status := v.run(t, "vol-ro", ro)
		if out != "one\none\nread-only\n" || status != 0 {
			t.Fatalf("read-only volume: stdout %q (stderr %q) status %d", out, errOut, status)
		}
		p.stdin.Write([]byte("go\n"))
		if st := v.wait(t, p); st != 0 {
			t.Fatalf("read-write volume container exited %d: %q", st, p.stderr.wait(t))
		}
		if out := p.stdout.wait(t); out != "one\n" {
			t.Fatalf("stdout %q", out)
		}
		if b, err := os.ReadFile(filepath.Join(v.data, "new.txt")); err != nil || string(b) != "written\n" {
			t.Fatalf("host sees %q, %v; want the file the container wrote", b, err)
		}
	})

	t.Run("missing executable", func(t *testing.T) {
		p := v.create(t, "noexe", defaultSpec("/no/such/program"), false)
		_, err := v.client.StartProcess(rpcCtx(t), &agent.StartProcessRequest{ContainerId: p.cid})
		if err == nil || !strings.Contains(err.Error(), `exec: "/no/such/program"`) || !strings.Contains(err.Error(), "no such file or directory") {
			t.Fatalf("StartProcess error = %v, want runc-like exec error", err)
		}
		_, err = v.client.StartProcess(rpcCtx(t), &agent.StartProcessRequest{ContainerId: "noexe"})
		if !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("second StartProcess error = %v, want FailedPrecondition", err)
		}
		p2 := v.create(t, "noexe2", defaultSpec("no-such-program"), false)
		_, err = v.client.StartProcess(rpcCtx(t), &agent.StartProcessRequest{ContainerId: p2.cid})
		if err == nil || !strings.Contains(err.Error(), `exec: "no-such-program": executable file not found in $PATH`) {
			t.Fatalf("StartProcess error = %v, want executable file not found in $PATH", err)
		}
	})

	t.Run("sigkill is 137", func(t *testing.T) {
		p := v.create(t, "kill", defaultSpec("sleep", "1000"), false)
		v.start(t, p)
		if _, err := v.client.SignalProcess(rpcCtx(t), &agent.SignalProcessRequest{ContainerId: p.cid, Signal: uint32(unix.SIGKILL)}); err != nil {
			t.Fatal(err)
		}
		if st := v.wait(t, p); st != 137 {
			t.Fatalf("status %d, want 137", st)
		}
		// Waiting again keeps answering; signalling a finished process is NotFound.
		if st := v.wait(t, p); st != 137 {
			t.Fatalf("second wait: status %d, want 137", st)
		}
		_, err := v.client.SignalProcess(rpcCtx(t), &agent.SignalProcessRequest{ContainerId: p.cid, Signal: uint32(unix.SIGKILL)})
		if !errdefs.IsNotFound(err) {
			t.Fatalf("signal after exit: %v, want NotFound", err)
		}
	})

	t.Run("stdin round trip", func(t *testing.T) {
		p := v.create(t, "cat", defaultSpec("cat"), true)
		v.start(t, p)
		msg := "hello through stdin\nsecond line\n"
		if _, err := p.stdin.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		closeWrite(t, p.stdin)
		if st := v.wait(t, p); st != 0 {
			t.Fatalf("cat exited %d", st)
		}
		if out := p.stdout.wait(t); out != msg {
			t.Fatalf("stdout %q, want %q", out, msg)
		}
	})

	t.Run("close stdin rpc", func(t *testing.T) {
		p := v.create(t, "cat2", defaultSpec("sh", "-c", "cat; echo eof"), true)
		v.start(t, p)
		if _, err := p.stdin.Write([]byte("abc")); err != nil {
			t.Fatal(err)
		}
		if _, err := v.client.CloseStdin(rpcCtx(t), &agent.CloseStdinRequest{ContainerId: p.cid}); err != nil {
			t.Fatal(err)
		}
		if st := v.wait(t, p); st != 0 {
			t.Fatalf("exited %d", st)
		}
		if out := p.stdout.wait(t); out != "abceof\n" {
			t.Fatalf("stdout %q, want %q", out, "abceof\n")
		}
	})

	t.Run("pty and resize", func(t *testing.T) {
		spec := defaultSpec("sh", "-c", "tty; stty size; read x; stty size")
		spec.Process.Terminal = true
		spec.Process.ConsoleSize = &specs.Box{Height: 24, Width: 80}
		p := v.create(t, "pty", spec, true)
		v.start(t, p)
		p.stdout.waitFor(t, "24 80")
		if _, err := v.client.ResizePty(rpcCtx(t), &agent.ResizePtyRequest{ContainerId: p.cid, Width: 132, Height: 43}); err != nil {
			t.Fatal(err)
		}
		p.stdin.Write([]byte("go\n"))
		if st := v.wait(t, p); st != 0 {
			t.Fatalf("exited %d", st)
		}
		out := strings.ReplaceAll(p.stdout.wait(t), "\r\n", "\n")
		lines := strings.Split(out, "\n")
		if len(lines) < 4 || !strings.HasPrefix(lines[0], "/dev/pts/") || lines[1] != "24 80" || !strings.Contains(out, "go\n43 132\n") {
			t.Fatalf("terminal output %q: want /dev/pts/N, 24 80, the echoed go, then 43 132", out)
		}
	})

	t.Run("exec with a terminal", func(t *testing.T) {
		c := v.create(t, "exectty", defaultSpec("sleep", "1000"), false)
		v.start(t, c)

		// As containerd's client does it: the terminal is asked for on the
		// stdio only (cio.WithTerminal); the spec is the container's, no tty.
		// The size is set before the start, then changed while it runs.
		const n = 200000
		e := v.execStdio(t, c.cid, "tty1", &specs.Process{Args: []string{"sh", "-c", fmt.Sprintf("tty; stty size; read x; stty size; seq 1 %d", n)},
			Cwd: "/", Env: []string{"PATH=/bin"}}, true, true)
		resize := func(w, h uint32) {
			t.Helper()
			if _, err := v.client.ResizePty(rpcCtx(t), &agent.ResizePtyRequest{ContainerId: c.cid, ExecId: e.eid, Width: w, Height: h}); err != nil {
				t.Fatalf("ResizePty %dx%d: %v", w, h, err)
			}
		}
		resize(80, 24)
		v.start(t, e)
		e.stdout.waitFor(t, "24 80")
		resize(132, 43)
		e.stdin.Write([]byte("go\n"))
		if st := v.wait(t, e); st != 0 {
			t.Fatalf("tty exec exited %d; output so far %q", st, tail(e.stdout.String(), 200))
		}
		lines := strings.Split(strings.ReplaceAll(e.stdout.wait(t), "\r\n", "\n"), "\n")
		if len(lines) < 5 || !strings.HasPrefix(lines[0], "/dev/pts/") || lines[1] != "24 80" || lines[2] != "go" || lines[3] != "43 132" {
			t.Fatalf("tty exec output starts %q: want /dev/pts/N, 24 80, the echoed go, then 43 132", lines[:min(len(lines), 5)])
		}
		nums := lines[4:]
		if nums[len(nums)-1] == "" {
			nums = nums[:len(nums)-1]
		}
		if len(nums) != n {
			t.Fatalf("tty exec printed %d numbers through the pty, want %d (output ends %q)", len(nums), n, tail(e.stdout.String(), 40))
		}
		for i, l := range nums {
			if l != strconv.Itoa(i+1) {
				t.Fatalf("tty exec output line %d is %q, want %d", i+5, l, i+1)
			}
		}

		// The terminal asked for by the spec alone, and 4 MiB without a
		// newline (so no CR is added): every byte arrives before the exit.
		const size = 4 << 20
		big := v.exec(t, c.cid, "tty2", &specs.Process{Terminal: true, Args: []string{"sh", "-c", fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x", size)},
			Cwd: "/", Env: []string{"PATH=/bin"}}, false)
		v.start(t, big)
		if st := v.wait(t, big); st != 0 {
			t.Fatalf("large tty exec exited %d; output ends %q", st, tail(big.stdout.String(), 200))
		}
		out := big.stdout.wait(t)
		if len(out) != size || strings.Trim(out, "x") != "" {
			t.Fatalf("large tty exec delivered %d bytes (ends %q), want %d x's", len(out), tail(out, 40), size)
		}
	})

	t.Run("exec sees init in its pid namespace", func(t *testing.T) {
		p := v.create(t, "ns", defaultSpec("sleep", "1000"), false)
		v.start(t, p)
		e := v.exec(t, p.cid, "e1", &specs.Process{Args: []string{"sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; echo $PWD"}, Cwd: "/tmp",
			Env: []string{"PATH=/bin"}}, false)
		v.start(t, e)
		if st := v.wait(t, e); st != 0 {
			t.Fatalf("exec exited %d (stderr %q)", st, e.stderr.wait(t))
		}
		if out := e.stdout.wait(t); out != "sleep 1000 \ne2e\n/tmp\n" {
			t.Fatalf("exec stdout %q, want init's cmdline, the hostname and the cwd", out)
		}
		pids, err := v.client.Pids(rpcCtx(t), &agent.PidsRequest{ContainerId: p.cid})
		if err != nil || len(pids.Processes) != 1 {
			t.Fatalf("Pids after the exec exited = %v, %v; want only the init", pids, err)
		}
		if _, err := v.client.DeleteProcess(rpcCtx(t), &agent.DeleteProcessRequest{ContainerId: p.cid, ExecId: "e1"}); err != nil {
			t.Fatal(err)
		}
		_, err = v.client.WaitProcess(rpcCtx(t), &agent.WaitProcessRequest{ContainerId: p.cid, ExecId: "e1"})
		if !errdefs.IsNotFound(err) {
			t.Fatalf("wait after delete: %v, want NotFound", err)
		}
	})

	t.Run("kill all", func(t *testing.T) {
		p := v.create(t, "killall", defaultSpec("sh", "-c", "sleep 1000 & sleep 1000 & wait"), false)
		v.start(t, p)
		deadline := time.Now().Add(rpcTimeout)
		for {
			pids, err := v.client.Pids(rpcCtx(t), &agent.PidsRequest{ContainerId: p.cid})
			if err != nil {
				t.Fatal(err)
			}
			if len(pids.Processes) == 3 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pids %v, want 3 processes", pids.Processes)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if _, err := v.client.SignalProcess(rpcCtx(t), &agent.SignalProcessRequest{ContainerId: p.cid, Signal: uint32(unix.SIGKILL), All: true}); err != nil {
			t.Fatal(err)
		}
		if st := v.wait(t, p); st != 137 {
			t.Fatalf("init status %d, want 137", st)
		}
		pids, err := v.client.Pids(rpcCtx(t), &agent.PidsRequest{ContainerId: p.cid})
		if err != nil || len(pids.Processes) != 0 {
			t.Fatalf("pids after kill all = %v, %v; want none", pids, err)
		}
	})

	t.Run("stats", func(t *testing.T) {
		p := v.create(t, "stats", defaultSpec("sh", "-c", "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo spun; sleep 1000"), false)
		v.start(t, p)
		p.stdout.waitFor(t, "spun")
		resp, err := v.client.Stats(rpcCtx(t), &agent.StatsRequest{ContainerId: p.cid})
		if err != nil {
			t.Fatal(err)
		}
		m := resp.Metrics
		if m.GetMemory().GetUsage() == 0 || m.GetCPU().GetUsageUsec() == 0 || m.GetPids().GetCurrent() == 0 {
			t.Fatalf("stats memory usage %d, cpu usage %d us, pids %d: want all > 0", m.GetMemory().GetUsage(), m.GetCPU().GetUsageUsec(), m.GetPids().GetCurrent())
		}
		t.Logf("memory %d bytes, cpu %d us, pids %d", m.GetMemory().GetUsage(), m.GetCPU().GetUsageUsec(), m.GetPids().GetCurrent())
	})

	t.Run("oom kill", func(t *testing.T) {
		spec := defaultSpec("sh", "-c", "x=0123456789abcdef; while true; do x=$x$x; done")
		limit := int64(32 << 20)
		spec.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit, Swap: &limit}}
		p := v.create(t, "oom", spec, false)
		v.start(t, p)
		if st := v.wait(t, p); st != 137 {
			t.Fatalf("status %d, want 137 (OOM kill)", st)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		evs, err := v.client.WaitEvents(ctx, &agent.WaitEventsRequest{})
		if err != nil {
			t.Fatalf("WaitEvents: %v", err)
		}
		found := false
		for _, e := range evs.Events {
			if e.GetOom().GetContainerId() == "oom" {
				found = true
			}
		}
		if !found {
			t.Fatalf("events %v: no OOM event for the container", evs.Events)
		}
		resp, err := v.client.Stats(rpcCtx(t), &agent.StatsRequest{ContainerId: p.cid})
		if err != nil {
			t.Fatal(err)
		}
		if k := resp.Metrics.GetMemoryEvents().GetOomKill(); k < 1 {
			t.Fatalf("MemoryEvents.OomKill = %d, want >= 1", k)
		}
		if max := resp.Metrics.GetMemory().GetUsageLimit(); max != uint64(limit) {
			t.Errorf("memory limit %d, want %d", max, limit)
		}
	})

	t.Run("64MiB stdout intact", func(t *testing.T) {
		data := make([]byte, 64<<20)
		rand.Read(data)
		// The file reaches the container through a read-only bind mount of
		// a guest directory (here, one of the shared rootfs).
		os.MkdirAll(filepath.Join(v.rootfs, "srv"), 0o755)
		if err := os.WriteFile(filepath.Join(v.rootfs, "srv", "big.bin"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(filepath.Join(v.rootfs, "srv", "big.bin"))
		spec := defaultSpec("cat", "/data/big.bin")
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: "/data", Type: "bind", Source: "/run/macvm/c/big/rootfs/srv", Options: []string{"rbind", "ro"}})
		start := time.Now()
		out, errOut, status := v.run(t, "big", spec)
		if status != 0 {
			t.Fatalf("cat exited %d: %q", status, errOut)
		}
		if len(out) != len(data) || sha256.Sum256([]byte(out)) != sha256.Sum256(data) {
			t.Fatalf("stdout: %d bytes, sha256 %x; want %d bytes, sha256 %x", len(out), sha256.Sum256([]byte(out)), len(data), sha256.Sum256(data))
		}
		t.Logf("64 MiB in %v", time.Since(start))
	})

	t.Run("no zombies after orphans", func(t *testing.T) {
		// Without a PID namespace the orphans are reparented to the agent
		// (PID 1 of the VM), which must reap them.
		script := `(sleep 0.2 &); (sleep 0.2 &); (sleep 0.3 &); sleep 2; ` +
			`for s in /proc/[0-9]*/stat; do read -r line < $s 2>/dev/null && case "$line" in *") Z "*) echo "zombie: $line";; esac; done; echo done`
		out, errOut, status := v.run(t, "orphans", withoutNamespace(defaultSpec("sh", "-c", script), specs.PIDNamespace))
		if out != "done\n" || status != 0 {
			t.Fatalf("stdout %q (stderr %q) status %d; want just done", out, errOut, status)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		p := v.create(t, "pause", defaultSpec("sh", "-c", "read x; echo got $x"), true)
		v.start(t, p)
		if _, err := v.client.Pause(rpcCtx(t), &agent.PauseRequest{ContainerId: p.cid}); err != nil {
			t.Fatal(err)
		}
		p.stdin.Write([]byte("a\n"))
		time.Sleep(time.Second)
		if out := p.stdout.String(); out != "" {
			t.Fatalf("a paused container wrote %q", out)
		}
		if _, err := v.client.Resume(rpcCtx(t), &agent.ResumeRequest{ContainerId: p.cid}); err != nil {
			t.Fatal(err)
		}
		if st := v.wait(t, p); st != 0 {
			t.Fatalf("exited %d", st)
		}
		if out := p.stdout.wait(t); out != "got a\n" {
			t.Fatalf("stdout %q, want %q", out, "got a\n")
		}
	})

	t.Run("10 concurrent execs", func(t *testing.T) {
		p := v.create(t, "conc", defaultSpec("sleep", "1000"), false)
		v.start(t, p)
		var wg sync.WaitGroup
		errs := make(chan error, 10)
		for i := 0; i < 10; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				id := fmt.Sprintf("x%d", i)
				e := v.exec(t, p.cid, id, &specs.Process{Args: []string{"sh", "-c", fmt.Sprintf("echo exec-%d; echo err-%d >&2; exit %d", i, i, i)}, Cwd: "/"}, false)
				if _, err := v.client.StartProcess(rpcCtx(t), &agent.StartProcessRequest{ContainerId: p.cid, ExecId: id}); err != nil {
					errs <- err
					return
				}
				resp, err := v.client.WaitProcess(rpcCtx(t), &agent.WaitProcessRequest{ContainerId: p.cid, ExecId: id})
				if err != nil {
					errs <- err
					return
				}
				out, errOut := e.stdout.wait(t), e.stderr.wait(t)
				if resp.ExitStatus != uint32(i) || out != fmt.Sprintf("exec-%d\n", i) || errOut != fmt.Sprintf("err-%d\n", i) {
					errs <- fmt.Errorf("exec %d: status %d stdout %q stderr %q", i, resp.ExitStatus, out, errOut)
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("exec after init exit is refused", func(t *testing.T) {
		out, _, _ := v.run(t, "gone", defaultSpec("true"))
		if out != "" {
			t.Fatalf("stdout %q", out)
		}
		b := []byte(`{"args":["true"],"cwd":"/"}`)
		_, err := v.client.ExecProcess(rpcCtx(t), &agent.ExecProcessRequest{ContainerId: "gone", ExecId: "late", Process: b})
		if !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("exec after exit: %v, want FailedPrecondition", err)
		}
	})

	t.Run("delete container", func(t *testing.T) {
		p := v.create(t, "del", defaultSpec("sleep", "1000"), false)
		v.start(t, p)
		if _, err := v.client.DeleteContainer(rpcCtx(t), &agent.DeleteContainerRequest{ContainerId: "del"}); err != nil {
			t.Fatal(err)
		}
		_, err := v.client.Pids(rpcCtx(t), &agent.PidsRequest{ContainerId: "del"})
		if !errdefs.IsNotFound(err) {
			t.Fatalf("Pids after delete: %v, want NotFound", err)
		}
		// The id can be used again.
		out, _, status := v.run(t, "del", defaultSpec("echo", "again"))
		if out != "again\n" || status != 0 {
			t.Fatalf("re-created container: %q %d", out, status)
		}
	})
}

// TestShutdownPowersOff checks that Shutdown really ends the VM (QEMU
// exits cleanly, not through a kill).
func TestShutdownPowersOff(t *testing.T) {
	v := bootVM(t)
	t.Logf("boot time (qemu start -> agent ready): %v", v.boot)
	p := v.create(t, "victim", defaultSpec("sleep", "1000"), false)
	v.start(t, p)
	if _, err := v.client.Shutdown(rpcCtx(t), &emptypb.Empty{}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case <-v.m.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("VM still running 30s after Shutdown\nconsole:\n%s", v.m.ConsoleTail(2048))
	}
	if err := v.m.Err(); err != nil {
		t.Fatalf("VM exit: %v, want a clean power-off", err)
	}
	_ = bytes.MinRead
}

// tail returns the last n bytes of s.
func tail(s string, n int) string { return s[max(0, len(s)-n):] }
