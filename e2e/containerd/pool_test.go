package containerd_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
	"github.com/macvm/macvm/pkg/vm"
)

// poolWait bounds the pool daemon's refill (one restore per VM) on a
// loaded TCG machine.
const poolWait = 3 * time.Minute

// TestWarmStartPool runs containers with warm_start = "pool" and
// pool_size = 2: the first `ctr run` boots cold (no template yet), the
// second is a template clone and starts the pool daemon, which fills its
// pool; two containers run at once then both get pooled VMs, each with
// its own root filesystem (one with a bind mount) and its own random
// stream; the pool refills. Two containers from the pool outlive a
// SIGKILL of the daemon: both answer execs; one exits normally later,
// the other's shim is killed and containerd's cleanup kills its VM. The
// next run falls back to a template clone and starts a new daemon, which
// kills the VMs the killed one had not handed out and adopts the lease
// still in use (its VM goes with its container); stopped by its pidfile,
// the daemon and every qemu of it are gone and its VM directories
// removed.
func TestWarmStartPool(t *testing.T) {
	rt := harness.Macvm()
	d := daemonWith(t, rt, harness.Options{Paths: suite.Paths, WarmStart: "pool",
		MacvmConfigExtra: "pool_size = 2\npool_idle_timeout = \"10m\""})
	poolDir := filepath.Join(d.TemplateDir, "pool")
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(poolDir, "pool.log"))
			t.Logf("pool.log:\n%s", b)
		}
	})

	runOK := func(id string, extra []string, want string, cmd ...string) string {
		t.Helper()
		res := run(t, d, rt, nil, extra, id, cmd...)
		if res.ExitCode != 0 || strings.TrimSpace(string(res.Stdout)) != want {
			t.Fatalf("ctr run %s: %v, want stdout %q", id, res, want)
		}
		return startMode(t, d, id)
	}
	echo := func(id string) string {
		return runOK(id, nil, "ok-"+id, "sh", "-c", "cat /etc/hostname >/dev/null; echo ok-"+id)
	}

	if mode := echo("pool1"); mode != "cold" {
		t.Fatalf("first container: start_mode=%s, want cold (no template yet)", mode)
	}
	key := waitTemplate(t, d, "")
	if mode := echo("pool2"); mode != "template" {
		t.Fatalf("second container: start_mode=%s, want template (the pool daemon starts now)", mode)
	}
	waitPool(t, poolDir, key, 2)

	// Two containers at once, both from the pool: each its own rootfs
	// (one with a bind mount), each its own random stream.
	vol := t.TempDir()
	if err := os.WriteFile(filepath.Join(vol, "f"), []byte("volume-of-pool3"), 0o644); err != nil {
		t.Fatal(err)
	}
	ids := []string{"pool3", "pool4"}
	extras := [][]string{{"--mount", "type=bind,src=" + vol + ",dst=/data,options=rbind:ro"}, nil}
	scripts := []string{
		"cat /data/f; echo; echo pool3 >/marker; cat /marker; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
		"test ! -e /data/f && test ! -e /marker && echo pool4 >/marker; cat /marker; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
	}
	var wg sync.WaitGroup
	results := make([]harness.Result, 2)
	errs := make([]error, 2)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = d.Run(ctx(t, step), rt, nil, extras[i], ids[i], "sh", "-c", scripts[i])
		}()
	}
	wg.Wait()
	var streams []string
	for i, id := range ids {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		lines := strings.Split(strings.TrimSpace(string(results[i].Stdout)), "\n")
		want := []string{id}
		if i == 0 {
			want = []string{"volume-of-pool3", id}
		}
		if results[i].ExitCode != 0 || len(lines) != len(want)+1 || strings.Join(lines[:len(want)], ",") != strings.Join(want, ",") ||
			len(lines[len(want)]) != 64 {
			t.Fatalf("ctr run %s: %v; want lines %q and 32 random bytes in hex", id, results[i], want)
		}
		streams = append(streams, lines[len(want)])
		if mode := startMode(t, d, id); mode != "pool" {
			t.Errorf("%s: start_mode=%s, want pool", id, mode)
		}
	}
	if streams[0] == streams[1] {
		t.Errorf("two pooled VMs read the same random bytes: %s", streams[0])
	}

	// Refilled in the background; the handed-out VMs' directories are gone.
	waitPool(t, poolDir, key, 2)
	waitVMDirs(t, poolDir, 2)

	// Two containers from the pool outlive the daemon: SIGKILL it while
	// they run. One still answers execs and exits normally; the other's
	// shim is killed too, and containerd's cleanup of the dead shim kills
	// its VM (no daemon is left to end the lease).
	lids := []string{"lease1", "lease2"}
	for _, id := range lids {
		runDetached(t, d, rt, nil, id, "sh", "-c", `trap "exit 0" TERM; while true; do sleep 0.2; done`)
	}
	leased := map[string]harness.Proc{}
	for _, id := range lids {
		waitStatus(t, d, id, "RUNNING", 2*time.Minute)
		if mode := startMode(t, d, id); mode != "pool" {
			t.Fatalf("%s: start_mode=%s, want pool", id, mode)
		}
	}
	// Refilled: the daemon holds ready VMs of its own when it dies.
	waitPool(t, poolDir, key, 2)
	pid := poolPid(t, poolDir)
	below, err := harness.Descendants(pid)
	if err != nil {
		t.Fatal(err)
	}
	var daemonQemus []harness.Proc // the ready (or filling) VMs
	for _, p := range below {
		if !strings.Contains(p.Cmdline, poolDir+"/vm-") {
			continue
		}
		isLeased := false
		for _, id := range lids {
			if vmPid, vmDir := bundleVM(t, d, id); vmPid == p.Pid {
				if !strings.HasPrefix(vmDir, poolDir+"/vm-") {
					t.Errorf("%s: recorded pool directory %q, want one below %s", id, vmDir, poolDir)
				}
				leased[id] = p
				isLeased = true
			}
		}
		if !isLeased {
			daemonQemus = append(daemonQemus, p)
		}
	}
	if len(leased) != len(lids) || len(daemonQemus) < 2 {
		t.Fatalf("among the daemon's children: qemus of the pooled containers %v, ready ones %v, want 2 each (children %v)", leased, daemonQemus, below)
	}
	daemon := mustProc(t, pid)
	t.Logf("killing pool daemon %d; leased VMs %v, its own %v", pid, leased, daemonQemus)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, "pool daemon", daemon)
	for _, id := range lids {
		res := ctrOK(t, d, "task", "exec", "--exec-id", "after-kill", id, "echo", "alive-"+id)
		if string(res.Stdout) != "alive-"+id+"\n" {
			t.Fatalf("%s: exec after the pool daemon was killed: %v", id, res)
		}
	}
	shim, err := d.ShimPid("lease2")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(shim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, "the VM of a killed shim (containerd's cleanup)", leased["lease2"])
	for deadline := time.Now().Add(2 * time.Minute); ; {
		if st := taskStatus(t, d, "lease2"); st == "STOPPED" || st == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lease2 not stopped after its shim was killed")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if res := ctr(t, d, nil, "task", "delete", "lease2"); res.ExitCode != 0 && !strings.Contains(string(res.Stderr), "not found") {
		t.Errorf("task delete after shim death: %v", res)
	}
	ctrOK(t, d, "container", "delete", "lease2")

	// The next run is a template clone and starts a new daemon, which
	// kills the VMs the old one held and adopts lease1's lease.
	if mode := echo("pool5"); mode != "template" {
		t.Fatalf("container after killing the pool daemon: start_mode=%s, want template", mode)
	}
	for _, p := range daemonQemus {
		waitGone(t, "a ready VM of the killed daemon", p)
	}
	waitPool(t, poolDir, key, 2)
	if newPid := poolPid(t, poolDir); newPid == pid {
		t.Fatalf("pool daemon pid %d unchanged after SIGKILL", pid)
	}
	if st, err := vm.PoolStatus(ctx(t, step), poolDir); err != nil || st[key].Leased != 1 {
		t.Errorf("new daemon's status %s %v: want lease1's VM counted as leased", statusString(st), err)
	}
	if !harness.Alive(leased["lease1"]) {
		t.Fatal("lease1's VM died after the new daemon started")
	}
	res := ctrOK(t, d, "task", "exec", "--exec-id", "adopted", "lease1", "echo", "still-alive")
	if string(res.Stdout) != "still-alive\n" {
		t.Fatalf("exec after the new daemon started: %v", res)
	}
	ctrOK(t, d, "task", "kill", "lease1")
	if code := exitStatus(t, d, "lease1", 2*time.Minute); code != 0 {
		t.Errorf("lease1 exit status %d, want 0 (its TERM trap)", code)
	}
	ctrOK(t, d, "task", "delete", "lease1")
	ctrOK(t, d, "container", "delete", "lease1")
	waitGone(t, "lease1's VM after its container was deleted", leased["lease1"])

	if mode := echo("pool6"); mode != "pool" {
		t.Fatalf("container from the new daemon's pool: start_mode=%s, want pool", mode)
	}

	// Stopped by its pidfile, as `make pool-stop` does: the daemon and
	// all its qemu go.
	stop := exec.Command(filepath.Join(suite.Paths.BinDir, "containerd-shim-macvm-v1"), "macvm-pool-stop", d.TemplateDir)
	var out strings.Builder
	stop.Stdout, stop.Stderr = &out, &out
	if err := harness.RunCmd(stop); err != nil {
		t.Fatalf("macvm-pool-stop: %v: %s", err, out.String())
	}
	waitNoQemu(t, poolDir)
	waitVMDirs(t, poolDir, 0)
	if _, err := os.Stat(vm.PoolPidFile(poolDir)); !os.IsNotExist(err) {
		t.Errorf("pidfile left after the daemon stopped: %v", err)
	}
	if l, err := d.WaitClean(time.Minute, true); err != nil || len(l.Procs) > 0 {
		t.Errorf("processes left after stopping the pool: %v %s", err, l)
	}
}

// stopPoolClean stops d's pool daemon as `make pool-stop` does and checks
// that no qemu, VM directory or other process of it is left.
func stopPoolClean(t *testing.T, d *harness.Containerd) {
	t.Helper()
	poolDir := filepath.Join(d.TemplateDir, "pool")
	stop := exec.Command(filepath.Join(suite.Paths.BinDir, "containerd-shim-macvm-v1"), "macvm-pool-stop", d.TemplateDir)
	var out strings.Builder
	stop.Stdout, stop.Stderr = &out, &out
	if err := harness.RunCmd(stop); err != nil {
		t.Fatalf("macvm-pool-stop: %v: %s", err, out.String())
	}
	waitNoQemu(t, poolDir)
	waitVMDirs(t, poolDir, 0)
	if l, err := d.WaitClean(time.Minute, true); err != nil || len(l.Procs) > 0 {
		t.Errorf("processes left after stopping the pool: %v %s", err, l)
	}
}

// bundleVM reads the VM's pid and pool directory the shim recorded in
// container id's bundle (for containerd's cleanup of a dead shim).
func bundleVM(t *testing.T, d *harness.Containerd, id string) (int, string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.BundleDir(id), "macvm-state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		VMPid     int    `json:"vm_pid"`
		VMPoolDir string `json:"vm_pool_dir"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st.VMPid, st.VMPoolDir
}

// mustProc is the harness's view of pid (with its start time).
func mustProc(t *testing.T, pid int) harness.Proc {
	t.Helper()
	ps, err := harness.Descendants(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.Pid == pid {
			return p
		}
	}
	t.Fatalf("process %d is not among the test's descendants", pid)
	return harness.Proc{}
}

// waitGone waits until process p (pid and start time) has exited.
func waitGone(t *testing.T, what string, p harness.Proc) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for harness.Alive(p) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (%v) still runs", what, p)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitPool waits until the pool daemon of dir has n VMs of key ready.
func waitPool(t *testing.T, dir, key string, n int) {
	t.Helper()
	deadline := time.Now().Add(poolWait)
	var last string
	for {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := vm.PoolStatus(c, dir)
		cancel()
		if err == nil && st[key].Ready == n {
			t.Logf("pool of %s: %+v", key, st[key])
			return
		}
		last = strings.TrimSpace(strings.Join([]string{errString(err), statusString(st)}, " "))
		if time.Now().After(deadline) {
			t.Fatalf("pool of template %s: no %d ready VMs after %v (last: %s)", key, n, poolWait, last)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func statusString(st map[string]vm.PoolKeyStatus) string {
	var b strings.Builder
	for k, s := range st {
		b.WriteString(k + ":ready=" + strconv.Itoa(s.Ready) + ",leased=" + strconv.Itoa(s.Leased) + " ")
	}
	return b.String()
}

// poolPid reads the pool daemon's pidfile.
func poolPid(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(vm.PoolPidFile(dir))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// poolQemus lists the live qemu processes of the pool in dir (their
// command line names their directory below it).
func poolQemus(dir string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmd), "qemu") || !strings.Contains(string(cmd), dir+"/vm-") {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:])); len(f) > 0 && f[0] == "Z" {
				continue // exited, waiting to be reaped
			}
		}
		pids = append(pids, pid)
	}
	return pids
}

// waitNoQemu waits until no qemu of the pool runs.
func waitNoQemu(t *testing.T, dir string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		pids := poolQemus(dir)
		if len(pids) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool qemu processes still running: %v", pids)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitVMDirs waits until the pool directory holds n VM directories.
func waitVMDirs(t *testing.T, dir string, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var dirs []string
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if e.IsDir() && strings.HasPrefix(e.Name(), "vm-") {
				dirs = append(dirs, e.Name())
			}
		}
		if len(dirs) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool VM directories %v, want %d", dirs, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
