package containerd_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
	d, err := harness.Start(ctx, harness.Options{Paths: paths})
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
			harness.EnvBinDir+"="+paths.BinDir, harness.EnvBootDir+"="+paths.BootDir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := harness.StartCmd(cmd, nil); err != nil {
			t.Fatal(err)
		}
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

		deadline := time.Now().Add(time.Minute)
		for {
			var alive []harness.Proc
			for _, p := range procs {
				if harness.Alive(p) {
					alive = append(alive, p)
				}
			}
			ents, _ := os.ReadDir(dir)
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			if len(alive) == 0 && len(names) == 1 && names[0] == "guardian.log" {
				b, _ := os.ReadFile(filepath.Join(dir, "guardian.log"))
				t.Logf("guardian log:\n%s", b)
				os.RemoveAll(dir)
				return
			}
			if time.Now().After(deadline) {
				harness.KillProcs(alive, 10*time.Second)
				t.Fatalf("a minute after the test process died: alive %v, %s holds %v", alive, dir, names)
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
