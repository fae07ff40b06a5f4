package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Who owns a pooled VM.
//
// A pooled qemu is the daemon's child but does not die with it (no
// parent-death signal): a VM handed out to a shim runs that shim's
// containers, and a daemon that crashes or is killed must not take them
// along. So the daemon writes down, in each VM's directory, which qemu
// runs there and who owns it: nobody yet (the daemon itself: the VM is
// starting or ready) or the shim it was handed to. Whoever finds the
// directory without a daemon that knows it (the next daemon, StopPool)
// acts on that record:
//
//   - the qemu no longer runs: the directory goes once nothing is mounted
//     below it;
//   - it runs and nobody took it, or its owner is gone: it is killed;
//   - it runs and its owner still does (and holds a pidfd of it, as a
//     shim does while it uses the VM): the next daemon adopts the lease
//     (it kills the qemu once the owner exits), StopPool leaves it alone.
//
// A process is only trusted to be the one recorded if its pid, its start
// time (clock ticks since boot) and the boot all match, and, for a qemu,
// its command line names the VM's directory: a recycled pid is never
// killed.

// poolRecordFile is the record's name in a pooled VM's directory.
const poolRecordFile = "owner.json"

// poolRecord is what a pooled VM's directory says about its qemu.
type poolRecord struct {
	// Key is the template key the VM is a clone of.
	Key string `json:"key"`
	// BootID is the kernel's boot id when the record was written: after a
	// reboot no process of the record runs.
	BootID string `json:"boot_id"`
	// Pid and Start name the qemu process.
	Pid   int    `json:"pid"`
	Start uint64 `json:"start"`
	// Owner and OwnerStart name the shim the VM was handed to; Owner is 0
	// while the daemon holds the VM.
	Owner      int    `json:"owner,omitempty"`
	OwnerStart uint64 `json:"owner_start,omitempty"`
}

// writePoolRecord replaces dir's record atomically: a crash never leaves
// half a record for the next daemon.
func writePoolRecord(dir string, rec poolRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, poolRecordFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("pool record: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, poolRecordFile)); err != nil {
		return fmt.Errorf("pool record: %w", err)
	}
	return nil
}

// readPoolRecord reads dir's record; ErrNotFound when there is none.
func readPoolRecord(dir string) (poolRecord, error) {
	var rec poolRecord
	b, err := os.ReadFile(filepath.Join(dir, poolRecordFile))
	if errors.Is(err, fs.ErrNotExist) {
		return rec, fmt.Errorf("pool record of %s: %w", dir, errdefs.ErrNotFound)
	}
	if err != nil {
		return rec, err
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("pool record of %s: %v: %w", dir, err, errdefs.ErrDataLoss)
	}
	return rec, nil
}

// bootID is the kernel's random boot id.
func bootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

// procStart is pid's start time in clock ticks after boot (field 22 of
// /proc/PID/stat): with the pid, it names a process for the whole boot.
func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: %q: %w", pid, b, errdefs.ErrDataLoss)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %q: %w", pid, b, errdefs.ErrDataLoss)
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// openRecorded returns a pidfd of the process pid started at start, if
// that process still exists (a zombie counts: it has exited, and polling
// the pidfd says so) and its command line contains each of cmdlineHas. The pidfd is opened before the checks, so the process it
// refers to is the one checked. ErrNotFound otherwise.
func openRecorded(pid int, start uint64, cmdlineHas ...string) (*os.File, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("pid %d: %w", pid, errdefs.ErrNotFound)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("process %d: %w: %w", pid, errdefs.ErrNotFound, err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	got, err := procStart(pid)
	if err != nil || got != start {
		f.Close()
		return nil, fmt.Errorf("process %d is not the one recorded (started at %d, want %d): %w", pid, got, start, errdefs.ErrNotFound)
	}
	if len(cmdlineHas) > 0 {
		cmd, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err != nil || !containsAll(cmd, cmdlineHas) {
			// A zombie's command line reads empty: it has exited, which is
			// what the caller learns from ErrNotFound too.
			f.Close()
			return nil, fmt.Errorf("process %d does not name %q: %w", pid, cmdlineHas, errdefs.ErrNotFound)
		}
	}
	return f, nil
}

func containsAll(b []byte, subs []string) bool {
	for _, s := range subs {
		if !bytes.Contains(b, []byte(s)) {
			return false
		}
	}
	return true
}

// pidfdExited says whether the process of the pidfd has exited, waiting
// up to timeout (0: just look).
func pidfdExited(f *os.File, timeout time.Duration) bool {
	return pidfdWait(int(f.Fd()), max(timeout, time.Millisecond))
}

// killPidfd sends SIGKILL through the pidfd and waits up to timeout for
// the process to exit (not our child: someone else reaps it).
func killPidfd(f *os.File, timeout time.Duration) bool {
	err := unix.PidfdSendSignal(int(f.Fd()), unix.SIGKILL, nil, 0)
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return false
	}
	return pidfdExited(f, timeout)
}

// peerOwner names the process at the other end of c (SO_PEERCRED): the
// shim a VM is handed to, recorded as its owner.
func peerOwner(c *net.UnixConn) (pid int, start uint64, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if credErr != nil {
		return 0, 0, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	start, err = procStart(int(cred.Pid))
	if err != nil {
		return 0, 0, fmt.Errorf("pool client %d: %w: %w", cred.Pid, errdefs.ErrNotFound, err)
	}
	return int(cred.Pid), start, nil
}

// poolSweepInterval is how often a daemon looks at the VM directories it
// does not know (a previous daemon's, or its own whose removal waited for
// an unmount).
const poolSweepInterval = 10 * time.Second

// orphan is a pooled VM's directory no running daemon knows, and what of
// its record still runs.
type orphan struct {
	dir string
	rec poolRecord
	// qemu is a pidfd of its qemu, nil when that no longer runs; owner
	// one of the shim it was handed to, nil when none or gone.
	qemu, owner *os.File
}

func (o *orphan) close() {
	for _, f := range []*os.File{o.qemu, o.owner} {
		if f != nil {
			f.Close()
		}
	}
}

// inspectOrphan reads dir's record and opens what of it still runs.
func inspectOrphan(dir, boot string) orphan {
	o := orphan{dir: dir}
	rec, err := readPoolRecord(dir)
	if err != nil {
		// No record: the daemon died before it started a qemu there or
		// before it wrote the record down (never after a hand-over: the
		// owner is recorded first). A qemu that runs there names the
		// directory on its command line.
		o.qemu = openNaming(dir+"/", poolMonArg)
		return o
	}
	o.rec = rec
	if rec.BootID != boot {
		return o
	}
	q, err := openRecorded(rec.Pid, rec.Start, dir+"/", poolMonArg)
	if err != nil {
		return o
	}
	if pidfdExited(q, 0) {
		q.Close()
		return o
	}
	o.qemu = q
	if rec.Owner != 0 {
		if ow, err := openRecorded(rec.Owner, rec.OwnerStart); err == nil {
			// A daemon that died after recording the owner but before the
			// hand-over reached it left a VM the shim never got (its take
			// failed and it started a clone): the owner holds no pidfd of
			// it, so nobody holds it.
			if pidfdExited(ow, 0) || !holdsPidfd(rec.Owner, rec.Pid) {
				ow.Close()
			} else {
				o.owner = ow
			}
		}
	}
	return o
}

// holdsPidfd says whether process pid holds a pidfd of process target (a
// shim holds its pooled VM's qemu's until that exits). When pid's
// descriptors cannot be read it says yes: a VM is never killed because
// its owner could not be checked.
func holdsPidfd(pid, target int) bool {
	dir := "/proc/" + strconv.Itoa(pid)
	ents, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return true
	}
	want := "Pid:\t" + strconv.Itoa(target) + "\n"
	for _, e := range ents {
		if l, err := os.Readlink(dir + "/fd/" + e.Name()); err != nil || !strings.Contains(l, "pidfd") {
			continue
		}
		if info, err := os.ReadFile(dir + "/fdinfo/" + e.Name()); err == nil && strings.Contains(string(info), want) {
			return true
		}
	}
	return false
}

// openNaming returns a pidfd of a live process whose command line
// contains each of subs, or nil.
func openNaming(subs ...string) *os.File {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !containsAll(cmd, subs) {
			continue
		}
		start, err := procStart(pid)
		if err != nil {
			continue
		}
		if f, err := openRecorded(pid, start, subs...); err == nil {
			if !pidfdExited(f, 0) {
				return f
			}
			f.Close()
		}
	}
	return nil
}

// sweepOrphans deals with every VM directory below dir that known does
// not name, as described at the top of this file: a qemu nobody holds is
// killed, a directory without a running qemu removed once nothing is
// mounted below it, and a VM whose owner still runs is given to adopt,
// which then owns the orphan's pidfds.
func sweepOrphans(dir string, known func(string) bool, adopt func(orphan), logf func(string, ...any)) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	boot, err := bootID()
	if err != nil {
		logf("pool: %v", err)
		return
	}
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "vm-") {
			continue
		}
		vdir := filepath.Join(dir, e.Name())
		if known(vdir) {
			continue
		}
		o := inspectOrphan(vdir, boot)
		switch {
		case o.qemu != nil && o.owner != nil:
			adopt(o)
			continue
		case o.qemu != nil:
			gone := killPidfd(o.qemu, 10*time.Second)
			if o.rec.Pid == 0 {
				logf("pool: %s: killed the qemu running there without a record (its daemon died starting it); exited: %v", vdir, gone)
			} else {
				logf("pool: %s: killed its qemu (pid %d, owner %d), which no daemon or shim holds; exited: %v", vdir, o.rec.Pid, o.rec.Owner, gone)
			}
			o.close()
			if !gone {
				continue
			}
		}
		o.close()
		if _, err := removeIfUnmounted(vdir); err != nil {
			logf("pool: removing %s: %v", vdir, err)
		}
	}
}

// ReclaimPool cleans the pool directory dir up when no daemon runs there
// (its lock is free): it kills the qemus a killed daemon left that no
// shim holds, and removes the directories of VMs that no longer run. VMs
// handed out to shims that still run are left to them. With a daemon
// running it does nothing: the daemon does this itself.
func ReclaimPool(dir string, logf func(string, ...any)) error {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	lock, err := os.OpenFile(PoolLockFile(dir), os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // no daemon ever ran here
	}
	if err != nil {
		return fmt.Errorf("pool lock: %w", err)
	}
	defer lock.Close()
	if err := flockNB(lock); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil
		}
		return fmt.Errorf("pool lock: %w", err)
	}
	sweepOrphans(dir, func(string) bool { return false }, func(o orphan) {
		logf("pool: %s: its qemu (pid %d) runs for shim %d: left to it", o.dir, o.rec.Pid, o.rec.Owner)
		o.close()
	}, logf)
	return nil
}
