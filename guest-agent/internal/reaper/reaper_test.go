package reaper

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
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

// TestSlowStartDoesNotStallExits is the guest stall seen under load: a Start
// whose fork does not return (a clone into a frozen cgroup, or a very slow
// fork+exec) held the reaper's lock, so no exit in the guest was dispatched
// (`sleep 1` never returned) and every later Exec hung on the lock. Exits of
// registered processes and other Starts must go on meanwhile; the child of
// the slow Start, which exits before it is registered, must still get its
// exit, and orphans held back must be collected afterwards.
func TestSlowStartDoesNotStallExits(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	r := New()
	stop := make(chan struct{})
	defer close(stop)
	go r.Run(stop)

	startCmd := func(args ...string) (int, <-chan Exit) {
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
		return pid, ch
	}
	wait := func(what string, ch <-chan Exit) Exit {
		t.Helper()
		select {
		case e := <-ch:
			return e
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no exit within 5s while another Start is blocked", what)
			return Exit{}
		}
	}

	// A process started before the slow Start, exiting during it.
	_, before := startCmd("sleep", "0.3")

	// The slow Start: its child (which also leaves an orphan) exits at once,
	// and the fork "returns" only when release is closed.
	release := make(chan struct{})
	slow := exec.Command("sh", "-c", "sleep 0.1 & exit 4")
	type started struct {
		pid int
		ch  <-chan Exit
		err error
	}
	slowc := make(chan started, 1)
	forked := make(chan int, 1)
	go func() {
		pid, ch, err := r.Start(func() (int, error) {
			if err := slow.Start(); err != nil {
				forked <- 0
				return 0, err
			}
			forked <- slow.Process.Pid
			<-release
			return slow.Process.Pid, nil
		})
		slowc <- started{pid, ch, err}
	}()

	if e := wait("process started before", before); e.ExitStatus() != 0 {
		t.Errorf("sleep 0.3: status %d", e.ExitStatus())
	}
	// A Start during the slow one neither blocks nor loses its exit.
	_, during := startCmd("sh", "-c", "exit 7")
	if e := wait("process started during", during); e.ExitStatus() != 7 {
		t.Errorf("exit 7: status %d", e.ExitStatus())
	}

	// The slow child has exited unregistered by now: it must still be a
	// zombie (not reaped as an unknown pid, whose number could be reused).
	slowPid := <-forked
	if slowPid == 0 {
		t.Fatal("slow Start's fork failed")
	}
	deadline := time.Now().Add(5 * time.Second)
	for procState(slowPid) != "Z" {
		if time.Now().After(deadline) {
			t.Fatalf("slow Start's child is %q, want a zombie", procState(slowPid))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := r.Unclaimed(); n != 0 {
		t.Fatalf("%d unregistered exits reaped while a Start was in flight", n)
	}
	close(release)
	s := <-slowc
	if s.err != nil {
		t.Fatalf("slow Start: %v", s.err)
	}
	if e := wait("slow Start's child", s.ch); e.ExitStatus() != 4 {
		t.Errorf("slow child: status %d, want 4", e.ExitStatus())
	}
	// Its orphan (sleep 0.1) is collected once no Start is in flight.
	for r.Unclaimed() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("orphan held back during the slow Start was never reaped")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// procState is the state letter of /proc/<pid>/stat ("" if it is gone).
func procState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+3 > len(s) {
		return ""
	}
	return s[i+2 : i+3]
}
