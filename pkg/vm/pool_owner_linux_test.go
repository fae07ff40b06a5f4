package vm

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// standIn is a process that plays a pooled qemu (its command line names
// its VM directory, as qemu's does) or a shim: a shell blocked in its read
// builtin keeps its command line until it is killed.
type standIn struct {
	cmd    *exec.Cmd
	stdin  *os.File
	exited chan struct{}
}

func startStandIn(t *testing.T, arg string) *standIn {
	t.Helper()
	return startStandInWith(t, []string{arg}, nil)
}

// startQemu starts a stand-in pooled qemu of the VM directory dir: its
// command line names the directory and the pool's monitor, as qemu's does.
func startQemu(t *testing.T, dir string) *standIn {
	t.Helper()
	return startStandInWith(t, []string{dir + "/console.log", "socket," + poolMonArg + ",fd=6"}, nil)
}

// startShim starts a stand-in shim that holds a pidfd of the stand-in
// qemu, as a shim holds its pooled VM's.
func startShim(t *testing.T, qemu *standIn) *standIn {
	t.Helper()
	fd, err := unix.PidfdOpen(qemu.pid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	defer f.Close()
	return startStandInWith(t, []string{"shim"}, []*os.File{f})
}

func startStandInWith(t *testing.T, args []string, extra []*os.File) *standIn {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", append([]string{"-c", "read line"}, args...)...)
	cmd.Stdin = r
	cmd.ExtraFiles = extra
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r.Close()
	s := &standIn{cmd: cmd, stdin: w, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(s.exited) }()
	t.Cleanup(func() { cmd.Process.Kill(); w.Close(); <-s.exited })
	// The kernel fills the new command line in a moment after Start.
	for deadline := time.Now().Add(10 * time.Second); ; {
		if b, _ := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cmdline"); containsArg(b, args[0]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stand-in has no command line")
		}
		time.Sleep(time.Millisecond)
	}
	return s
}

// containsArg says whether arg is one of the command line's arguments.
func containsArg(cmdline []byte, arg string) bool {
	for _, a := range bytes.Split(cmdline, []byte{0}) {
		if string(a) == arg {
			return true
		}
	}
	return false
}

func (s *standIn) pid() int { return s.cmd.Process.Pid }

func (s *standIn) alive() bool {
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

// waitExit waits for the stand-in to be killed.
func (s *standIn) waitExit(t *testing.T, what string) {
	t.Helper()
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s (pid %d) still runs", what, s.pid())
	}
}

// record writes a pool record for the VM directory dir naming qemu (and
// owner, if any) and returns it.
func record(t *testing.T, dir, key string, qemu, owner int) poolRecord {
	t.Helper()
	boot, err := bootID()
	if err != nil {
		t.Fatal(err)
	}
	rec := poolRecord{Key: key, BootID: boot, Pid: qemu}
	if rec.Start, err = procStart(qemu); err != nil {
		t.Fatal(err)
	}
	if owner != 0 {
		rec.Owner = owner
		if rec.OwnerStart, err = procStart(owner); err != nil {
			t.Fatal(err)
		}
	}
	if err := writePoolRecord(dir, rec); err != nil {
		t.Fatal(err)
	}
	return rec
}

func vmDir(t *testing.T, pool, name string) string {
	t.Helper()
	dir := filepath.Join(pool, "vm-"+name)
	if err := os.MkdirAll(filepath.Join(dir, "share0"), 0o711); err != nil {
		t.Fatal(err)
	}
	return dir
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// TestSweepOrphans: what a killed daemon left, as the next one (or
// StopPool) finds it. A ready VM, a VM without a record (the daemon died
// before writing it), a VM whose shim is gone and one whose recorded shim
// runs but never got it (holds no pidfd of it) are killed and their
// directories removed; a VM whose shim runs and holds it is handed to adopt with
// pidfds of both; a record whose pid now belongs to another process (pid
// reuse) kills nothing; a directory the daemon knows is not touched.
func TestSweepOrphans(t *testing.T) {
	pool := t.TempDir()

	readyDir := vmDir(t, pool, "ready")
	ready := startQemu(t, readyDir)
	record(t, readyDir, "k", ready.pid(), 0)

	noRecDir := vmDir(t, pool, "norecord")
	noRec := startQemu(t, noRecDir)
	// Someone reading its log names the directory too, but is no qemu.
	reader := startStandIn(t, noRecDir+"/qemu.log")

	goneOwnerDir := vmDir(t, pool, "goneowner")
	goneOwnerQemu := startQemu(t, goneOwnerDir)
	goneOwner := startStandIn(t, "shim-that-dies")
	record(t, goneOwnerDir, "k", goneOwnerQemu.pid(), goneOwner.pid())
	goneOwner.cmd.Process.Kill()
	goneOwner.waitExit(t, "owner")

	ownedDir := vmDir(t, pool, "owned")
	ownedQemu := startQemu(t, ownedDir)
	owner := startShim(t, ownedQemu)
	ownedRec := record(t, ownedDir, "k2", ownedQemu.pid(), owner.pid())

	// The owner runs but never got the VM (the daemon died between
	// recording it and the hand-over): it holds no pidfd of the qemu.
	notHandedDir := vmDir(t, pool, "nothanded")
	notHandedQemu := startQemu(t, notHandedDir)
	notHandedOwner := startStandIn(t, "shim-without-the-vm")
	record(t, notHandedDir, "k", notHandedQemu.pid(), notHandedOwner.pid())

	// The recorded pid runs, with the recorded start time, but it is not
	// a qemu of this directory.
	reusedDir := vmDir(t, pool, "reused")
	other := startStandIn(t, "not-a-vm")
	record(t, reusedDir, "k", other.pid(), 0)

	knownDir := vmDir(t, pool, "known")
	known := startQemu(t, knownDir)
	record(t, knownDir, "k", known.pid(), 0)

	var mu sync.Mutex
	var adopted []orphan
	sweepOrphans(pool, func(d string) bool { return d == knownDir }, func(o orphan) {
		mu.Lock()
		defer mu.Unlock()
		adopted = append(adopted, o)
	}, t.Logf)

	ready.waitExit(t, "ready VM")
	noRec.waitExit(t, "VM without a record")
	goneOwnerQemu.waitExit(t, "VM of a dead shim")
	notHandedQemu.waitExit(t, "VM its recorded shim never got")
	if !notHandedOwner.alive() {
		t.Error("the recorded owner of a VM it never got was killed")
	}
	for _, d := range []string{readyDir, noRecDir, goneOwnerDir, reusedDir, notHandedDir} {
		if exists(d) {
			t.Errorf("%s left", d)
		}
	}
	if !other.alive() {
		t.Error("a process whose pid a record names, but that is not the VM, was killed")
	}
	if !reader.alive() {
		t.Error("a process naming a VM directory that is not its qemu was killed")
	}
	if !known.alive() || !exists(knownDir) {
		t.Error("a directory the daemon knows was touched")
	}
	if !ownedQemu.alive() || !exists(ownedDir) {
		t.Fatal("the VM of a running shim was killed or its directory removed")
	}
	if len(adopted) != 1 || adopted[0].dir != ownedDir || adopted[0].rec != ownedRec || adopted[0].qemu == nil || adopted[0].owner == nil {
		t.Fatalf("adopted %+v, want only %s with both pidfds", adopted, ownedDir)
	}
	// The pidfds are the processes': the owner's turns readable when the
	// owner exits, and a kill through the qemu's reaches the VM.
	o := adopted[0]
	defer o.close()
	if pidfdExited(o.owner, 0) || pidfdExited(o.qemu, 0) {
		t.Fatal("pidfds readable while both run")
	}
	owner.cmd.Process.Kill()
	if !pidfdExited(o.owner, 30*time.Second) {
		t.Fatal("owner's pidfd not readable after its exit")
	}
	if !killPidfd(o.qemu, 30*time.Second) {
		t.Fatal("kill through the pidfd")
	}
	ownedQemu.waitExit(t, "adopted VM")
}

// TestReclaimPool: without a daemon, StopPool's reclaim kills the VMs
// nobody holds and leaves a running shim's VM to it; while a daemon holds
// the lock it does nothing.
func TestReclaimPool(t *testing.T) {
	pool := t.TempDir()
	lock, err := os.OpenFile(PoolLockFile(pool), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()

	readyDir := vmDir(t, pool, "ready")
	ready := startQemu(t, readyDir)
	record(t, readyDir, "k", ready.pid(), 0)
	ownedDir := vmDir(t, pool, "owned")
	ownedQemu := startQemu(t, ownedDir)
	owner := startShim(t, ownedQemu)
	record(t, ownedDir, "k", ownedQemu.pid(), owner.pid())

	if err := flockNB(lock); err != nil {
		t.Fatal(err)
	}
	if err := ReclaimPool(pool, t.Logf); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if !ready.alive() || !exists(readyDir) {
		t.Fatal("reclaimed while a daemon holds the lock")
	}
	unix.Flock(int(lock.Fd()), unix.LOCK_UN)

	if err := ReclaimPool(pool, t.Logf); err != nil {
		t.Fatal(err)
	}
	ready.waitExit(t, "ready VM")
	if exists(readyDir) {
		t.Error("ready VM's directory left")
	}
	if !ownedQemu.alive() || !exists(ownedDir) {
		t.Error("a running shim's VM was reclaimed")
	}
	if err := StopPool(pool, time.Second); err != nil {
		t.Errorf("StopPool without a daemon: %v", err)
	}
	if !ownedQemu.alive() {
		t.Error("StopPool killed a running shim's VM")
	}
}

// TestPoolDaemonAdopts: a daemon that finds a VM a previous daemon handed
// out to a shim that still runs adopts its lease: PoolStatus counts it,
// the daemon does not exit idle while it runs, and once the shim exits
// the qemu is killed, its directory removed and the daemon exits.
func TestPoolDaemonAdopts(t *testing.T) {
	cfg := fakeConfig(t)
	tdir := t.TempDir()
	dir := filepath.Join(tdir, "pool")
	ownedDir := vmDir(t, dir, "owned")
	qemu := startQemu(t, ownedDir)
	owner := startShim(t, qemu)
	record(t, ownedDir, "adopted-key", qemu.pid(), owner.pid())
	readyDir := vmDir(t, dir, "ready")
	ready := startQemu(t, readyDir)
	record(t, readyDir, "adopted-key", ready.pid(), 0)

	d := &PoolDaemon{Dir: dir, Templates: &TemplateCache{Dir: tdir}, Logf: t.Logf}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- d.Run(ctx, &poolRequest{Op: poolOpTake, Config: cfg, Size: 1, IdleMs: 200}) }()

	ready.waitExit(t, "the previous daemon's ready VM")
	var st map[string]PoolKeyStatus
	for deadline := time.Now().Add(30 * time.Second); ; {
		var err error
		st, err = PoolStatus(ctx, dir)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st["adopted-key"].Leased != 1 {
		t.Errorf("status %+v: want the adopted lease counted", st)
	}
	// Well past the pool's idle time: the lease keeps the daemon.
	select {
	case err := <-ran:
		t.Fatalf("the daemon exited with an adopted lease: %v", err)
	case <-time.After(2 * time.Second):
	}
	if !qemu.alive() {
		t.Fatal("the adopted VM was killed while its shim runs")
	}
	owner.cmd.Process.Kill()
	qemu.waitExit(t, "the adopted VM after its shim exited")
	select {
	case err := <-ran:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not exit once the adopted lease ended")
	}
	if exists(ownedDir) || exists(readyDir) {
		t.Error("VM directories left")
	}
}

// TestHoldsPidfd: a process holds a pidfd of another when it has one
// among its descriptors, of that process.
func TestHoldsPidfd(t *testing.T) {
	qemu := startStandIn(t, "/pool/vm-x/console.log")
	other := startStandIn(t, "/pool/vm-y/console.log")
	shim := startShim(t, qemu)
	if !holdsPidfd(shim.pid(), qemu.pid()) {
		t.Error("the shim holds a pidfd of its qemu: not seen")
	}
	if holdsPidfd(shim.pid(), other.pid()) {
		t.Error("the shim holds no pidfd of another qemu: seen")
	}
	if holdsPidfd(other.pid(), qemu.pid()) {
		t.Error("a process without pidfds: seen holding one")
	}
}

// TestPeerOwner: the owner recorded for a hand-over is the process at
// the other end of the connection, with its start time.
func TestPeerOwner(t *testing.T) {
	a, _ := unixPair(t)
	pid, start, err := peerOwner(a)
	if err != nil {
		t.Fatal(err)
	}
	want, err := procStart(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if pid != os.Getpid() || start != want {
		t.Errorf("peer %d started at %d, want %d at %d", pid, start, os.Getpid(), want)
	}
}

// TestOpenRecorded: a pidfd is only handed out for the process the
// record names (pid and start time, and the command line when asked).
func TestOpenRecorded(t *testing.T) {
	s := startStandIn(t, "/pool/vm-x/console.log")
	start, err := procStart(s.pid())
	if err != nil {
		t.Fatal(err)
	}
	f, err := openRecorded(s.pid(), start, "/pool/vm-x/")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	for _, tc := range []struct {
		name  string
		start uint64
		cmd   string
	}{{"other start time", start + 1, ""}, {"other command line", start, "/pool/vm-y/"}} {
		if f, err := openRecorded(s.pid(), tc.start, tc.cmd); err == nil {
			f.Close()
			t.Errorf("%s: opened", tc.name)
		}
	}
	if _, err := readPoolRecord(t.TempDir()); !errdefs.IsNotFound(err) {
		t.Errorf("missing record: %v", err)
	}
}
