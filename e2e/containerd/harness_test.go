package containerd_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/e2e/harness"
)

// envVictim makes the test binary act as a test process that dies mid-run (see TestHarnessGuardian).
const envVictim = "MACVM_E2E_VICTIM"

// victim starts a daemon and a detached container on the runtime named by envVictim, reports them on
// stdout, and then waits to be killed, never cleaning up.
func victim(rtName string) {
	fail := func(err error) {
		fmt.Println("ERROR", err)
		os.Exit(1)
	}
	rt, err := harness.RuntimeByShort(rtName)
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	d, err := harness.Start(ctx, harness.Options{Paths: suite.Paths})
	if err != nil {
		fail(err)
	}
	if err := d.ImportBusybox(ctx); err != nil {
		fail(err)
	}
	res, err := d.Ctr(ctx, nil, d.RunArgs(rt, []string{"-d"}, "orphan", "sleep", "600")...)
	if err != nil || res.ExitCode != 0 {
		fail(fmt.Errorf("ctr run -d: %v %q", err, res.String()))
	}
	shim, err := d.ShimPid("orphan")
	if err != nil {
		fail(err)
	}
	fmt.Printf("DIR %s\nPID %d\nPID %d\n", d.Dir, d.Pid(), shim)
	// Wait for the container's process (runc) or VM (macvm) to show below the shim.
	var below []harness.Proc
	for i := 0; i < 100 && len(below) == 0; i++ {
		time.Sleep(100 * time.Millisecond)
		below, _ = harness.Descendants(shim)
	}
	for _, p := range below {
		fmt.Printf("PID %d\n", p.Pid)
	}
	fmt.Println("READY")
	select {}
}

// TestHarnessGuardian kills a test process that has a containerd, a shim and a container (a VM for
// macvm) running, as `go test -timeout` would, and checks the harness's guardian removes all of them
// and the private directory's contents.
func TestHarnessGuardian(t *testing.T) {
	forEachRuntime(t, false, func(t *testing.T, rt harness.Runtime) {
		if err := checkShim(rt); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), envVictim+"="+rt.Short,
			harness.EnvBinDir+"="+suite.Paths.BinDir, harness.EnvBootDir+"="+suite.Paths.BootDir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := harness.StartCmd(cmd, nil); err != nil {
			t.Fatal(err)
		}
		killed := false
		t.Cleanup(func() {
			// On an early failure the victim still waits to be killed: do it, so its guardian cleans up.
			if !killed {
				_ = cmd.Process.Kill()
				_ = harness.WaitCmd(cmd)
			}
		})
		var dir string
		var procs []harness.Proc
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 0 {
				continue
			}
			switch f[0] {
			case "DIR":
				dir = f[1]
			case "PID":
				pid, _ := strconv.Atoi(f[1])
				if p, ok := procByPid(pid); ok {
					procs = append(procs, p)
				}
			case "ERROR":
				t.Fatalf("victim: %s", sc.Text())
			}
			if f[0] == "READY" {
				break
			}
		}
		if dir == "" || len(procs) < 3 {
			t.Fatalf("victim reported dir %q and processes %v", dir, procs)
		}
		t.Logf("killing the test process %d; it leaves %v", cmd.Process.Pid, procs)
		_ = cmd.Process.Signal(unix.SIGKILL)
		_ = harness.WaitCmd(cmd)
		killed = true

		deadline := time.Now().Add(time.Minute)
		for {
			var alive []harness.Proc
			for _, p := range procs {
				if harness.Alive(p) {
					alive = append(alive, p)
				}
			}
			_, statErr := os.Stat(dir)
			if len(alive) == 0 && os.IsNotExist(statErr) {
				b, _ := os.ReadFile(harness.GuardianLog(dir))
				if i := strings.LastIndex(string(b), "cleaning up "+dir); i >= 0 {
					report := string(b)[strings.LastIndex(string(b)[:i], "\n")+1:]
					t.Logf("guardian report:\n%s", clipLines(report, 20))
				} else {
					t.Errorf("%s has no report of cleaning up %s", harness.GuardianLog(dir), dir)
				}
				return
			}
			if time.Now().After(deadline) {
				harness.KillProcs(alive, 10*time.Second)
				t.Fatalf("a minute after the test process died: alive %v, %s exists: %v", alive, dir, statErr == nil)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
}

func procByPid(pid int) (harness.Proc, bool) {
	procs, err := harness.Descendants(1)
	if err != nil {
		return harness.Proc{}, false
	}
	for _, p := range procs {
		if p.Pid == pid {
			return p, true
		}
	}
	return harness.Proc{}, false
}

// clipLines keeps the first n lines of s.
func clipLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}
