package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ipcmk -M SIZE [-p MODE]: creates a private System V shared memory segment in the caller's IPC
// namespace and prints its id as util-linux does (critest's HostIpc specs trim "Shared memory id: ").
func ipcmk(args []string) int {
	size, mode := -1, 0o644
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case (a == "-M" || a == "-p") && i+1 < len(args):
			i++
			n, err := strconv.ParseInt(args[i], 0, 64)
			if err != nil || n < 0 {
				return fail("ipcmk", 1, "invalid %s argument %q", a, args[i])
			}
			if a == "-M" {
				size = int(n)
			} else {
				mode = int(n)
			}
		default:
			return fail("ipcmk", 1, "unsupported argument %q (usage: ipcmk -M SIZE [-p MODE])", a)
		}
	}
	if size < 0 {
		return fail("ipcmk", 1, "usage: ipcmk -M SIZE [-p MODE]")
	}
	id, err := unix.SysvShmGet(unix.IPC_PRIVATE, size, unix.IPC_CREAT|unix.IPC_EXCL|mode)
	if err != nil {
		return fail("ipcmk", 1, "create share memory failed: %v", err)
	}
	fmt.Printf("Shared memory id: %d\n", id)
	return 0
}

// ipcrm -m ID...: removes shared memory segments by id.
func ipcrm(args []string) int {
	status := 0
	for i := 0; i < len(args); i++ {
		if args[i] != "-m" || i+1 >= len(args) {
			return fail("ipcrm", 1, "unsupported argument %q (usage: ipcrm -m ID...)", args[i])
		}
		i++
		id, err := strconv.Atoi(args[i])
		if err != nil {
			return fail("ipcrm", 1, "invalid id %q", args[i])
		}
		if _, err := unix.SysvShmCtl(id, unix.IPC_RMID, nil); err != nil {
			status = fail("ipcrm", 1, "shmctl(%d, IPC_RMID): %v", id, err)
		}
	}
	return status
}

// shmSegment is one line of /proc/sysvipc/shm, which lists the segments of the reader's IPC namespace.
type shmSegment struct {
	key                  int64
	id, perms, uid       int
	size, attached, cpid uint64
}

// ipcs [-m]: lists the shared memory segments of the caller's IPC namespace in util-linux's format.
// Semaphores and message queues are not listed (no test uses them).
func ipcs(args []string) int {
	for _, a := range args {
		if a != "-m" {
			return fail("ipcs", 1, "unsupported argument %q (only -m is implemented)", a)
		}
	}
	f, err := os.Open("/proc/sysvipc/shm")
	if err != nil {
		return fail("ipcs", 1, "%v", err)
	}
	defer f.Close()
	segs, err := parseSysvShm(f)
	if err != nil {
		return fail("ipcs", 1, "/proc/sysvipc/shm: %v", err)
	}
	writeIpcs(os.Stdout, segs)
	return 0
}

func parseSysvShm(r io.Reader) ([]shmSegment, error) {
	sc := bufio.NewScanner(r)
	var segs []shmSegment
	first := true
	for sc.Scan() {
		if first { // the header
			first = false
			continue
		}
		f := strings.Fields(sc.Text())
		if len(f) < 10 {
			continue
		}
		var s shmSegment
		var err error
		num := func(i int) uint64 {
			v, e := strconv.ParseUint(f[i], 10, 64)
			if e != nil && err == nil {
				err = fmt.Errorf("field %d of %q: %w", i+1, sc.Text(), e)
			}
			return v
		}
		if s.key, err = strconv.ParseInt(f[0], 10, 64); err != nil {
			return nil, fmt.Errorf("key of %q: %w", sc.Text(), err)
		}
		s.id = int(num(1))
		perms, perr := strconv.ParseUint(f[2], 8, 32)
		if perr != nil {
			return nil, fmt.Errorf("perms of %q: %w", sc.Text(), perr)
		}
		s.perms = int(perms)
		s.size, s.cpid, s.attached, s.uid = num(3), num(4), num(6), int(num(7))
		if err != nil {
			return nil, err
		}
		segs = append(segs, s)
	}
	return segs, sc.Err()
}

// writeIpcs prints segs as util-linux's `ipcs -m` does. The header has no digits, so a caller looking
// for a segment id in the output (critest) finds only real segments.
func writeIpcs(w io.Writer, segs []shmSegment) {
	fmt.Fprintf(w, "\n------ Shared Memory Segments --------\n")
	fmt.Fprintf(w, "%-10s %-10s %-10s %-10s %-10s %-10s %-12s\n", "key", "shmid", "owner", "perms", "bytes", "nattch", "status")
	for _, s := range segs {
		owner := strconv.Itoa(s.uid)
		if u, err := user.LookupId(owner); err == nil {
			owner = u.Username
		}
		status := ""
		if s.perms&0o1000 != 0 { // SHM_DEST: marked for removal
			status = "dest"
		}
		fmt.Fprintf(w, "0x%08x %-10d %-10s %-10o %-10d %-10d %-12s\n", uint32(s.key), s.id, owner, s.perms&0o777, s.size, s.attached, status)
	}
	fmt.Fprintln(w)
}
