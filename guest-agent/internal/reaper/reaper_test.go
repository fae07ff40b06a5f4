package reaper

import (
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeWait returns a wait4 that hands out the queued exits one per call.
func fakeWait(r *Reaper, queue *[]Exit) {
	r.wait4 = func(pid int, ws *unix.WaitStatus, options int, ru *unix.Rusage) (int, error) {
		if len(*queue) == 0 {
			return 0, nil
		}
		e := (*queue)[0]
		*queue = (*queue)[1:]
		*ws = e.Status
		return e.Pid, nil
	}
}

// exited builds the wait status of a normal exit with code.
func exited(code int) unix.WaitStatus { return unix.WaitStatus(code << 8) }

// killed builds the wait status of a death by sig.
func killed(sig unix.Signal) unix.WaitStatus { return unix.WaitStatus(sig) }

func TestExitStatus(t *testing.T) {
	for _, tc := range []struct {
		name string
		ws   unix.WaitStatus
		want uint32
	}{
		{"zero", exited(0), 0},
		{"code 3", exited(3), 3},
		{"code 255", exited(255), 255},
		{"sigkill", killed(unix.SIGKILL), 137},
		{"sigterm", killed(unix.SIGTERM), 143},
	} {
		if got := ExitStatus(tc.ws); got != tc.want {
			t.Errorf("%s: ExitStatus = %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestDispatchToRegistered(t *testing.T) {
	r := New()
	var q []Exit
	fakeWait(r, &q)
	pid, ch, err := r.Start(func() (int, error) { return 42, nil })
	if err != nil || pid != 42 {
		t.Fatalf("Start = %d, %v; want 42, nil", pid, err)
	}
	q = append(q, Exit{Pid: 42, Status: exited(3)})
	r.Reap()
	select {
	case e := <-ch:
		if e.Pid != 42 || e.ExitStatus() != 3 {
			t.Fatalf("got exit %+v (status %d), want pid 42 status 3", e, e.ExitStatus())
		}
	default:
		t.Fatal("exit not dispatched")
	}
	if _, open := <-ch; open {
		t.Fatal("channel not closed after the exit")
	}
	if n := r.Unclaimed(); n != 0 {
		t.Fatalf("unclaimed = %d, want 0", n)
	}
}

func TestLateRegisterGetsUnclaimedExit(t *testing.T) {
	r := New()
	q := []Exit{{Pid: 7, Status: killed(unix.SIGKILL)}, {Pid: 8, Status: exited(0)}}
	fakeWait(r, &q)
	r.Reap()
	if n := r.Unclaimed(); n != 2 {
		t.Fatalf("unclaimed = %d, want 2", n)
	}
	e := <-r.Register(7)
	if e.ExitStatus() != 137 {
		t.Fatalf("late register: status %d, want 137", e.ExitStatus())
	}
	if n := r.Unclaimed(); n != 1 {
		t.Fatalf("unclaimed after claim = %d, want 1", n)
	}
}

func TestStartDropsStaleExitOfReusedPid(t *testing.T) {
	r := New()
	q := []Exit{{Pid: 9, Status: exited(1)}}
	fakeWait(r, &q)
	r.Reap()
	_, ch, _ := r.Start(func() (int, error) { return 9, nil })
	select {
	case e := <-ch:
		t.Fatalf("new process with a reused pid got the old exit %+v", e)
	default:
	}
	q = append(q, Exit{Pid: 9, Status: exited(5)})
	r.Reap()
	if e := <-ch; e.ExitStatus() != 5 {
		t.Fatalf("status %d, want 5", e.ExitStatus())
	}
}

func TestUnclaimedIsBounded(t *testing.T) {
	r := New()
	var q []Exit
	for pid := 1; pid <= maxUnclaimed+10; pid++ {
		q = append(q, Exit{Pid: pid})
	}
	fakeWait(r, &q)
	r.Reap()
	if n := r.Unclaimed(); n != maxUnclaimed {
		t.Fatalf("unclaimed = %d, want %d", n, maxUnclaimed)
	}
	select {
	case <-r.Register(1):
		t.Fatal("oldest exit should have been evicted")
	default:
	}
}

// TestRealProcesses runs real children and an orphan (this test process is
// made a child subreaper, as PID 1 is in the VM).
func TestRealProcesses(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	r := New()
	stop := make(chan struct{})
	defer close(stop)
	go r.Run(stop)

	start := func(args ...string) (int, <-chan Exit) {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		pid, ch, err := r.Start(func() (int, error) {
			if err := cmd.Start(); err != nil {
				return 0, err
			}
			return cmd.Process.Pid, nil
		})
		if err != nil {
			t.Fatalf("start %v: %v", args, err)
		}
		if pid != cmd.Process.Pid {
			t.Fatalf("pid %d, want %d", pid, cmd.Process.Pid)
		}
		return pid, ch
	}
	wait := func(ch <-chan Exit) Exit {
		t.Helper()
		select {
		case e := <-ch:
			return e
		case <-time.After(10 * time.Second):
			t.Fatal("no exit within 10s")
			return Exit{}
		}
	}

	_, ch := start("sh", "-c", "exit 3")
	if e := wait(ch); e.ExitStatus() != 3 {
		t.Errorf("exit 3: got %d", e.ExitStatus())
	}

	pid, ch := start("sleep", "60")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if e := wait(ch); e.ExitStatus() != 137 {
		t.Errorf("SIGKILL: got %d, want 137", e.ExitStatus())
	}

	// The shell exits at once; its background child becomes our orphan and
	// must be reaped (kept as unclaimed) rather than left a zombie.
	_, ch = start("sh", "-c", "sleep 0.2 & echo $! >/dev/null; exit 0")
	wait(ch)
	deadline := time.Now().Add(10 * time.Second)
	for r.Unclaimed() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("orphan was not reaped")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
