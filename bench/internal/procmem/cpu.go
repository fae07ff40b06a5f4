package procmem

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// clockTick is the unit of utime/stime in /proc/PID/stat. USER_HZ is 100
// on every Linux architecture this project runs on (it is fixed by the
// kernel ABI, not by CONFIG_HZ).
const clockTick = 10 * time.Millisecond

// CPU returns the user+system CPU time pid has used so far (its threads
// included). CPU time, unlike wall time, hardly depends on what else the
// machine runs, which is what makes it useful on a shared machine.
func CPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	_, d, err := ParseStatCPU(b)
	return d, err
}

// Threads returns the CPU time of each of pid's threads, summed by thread
// name (QEMU names its threads: "CPU 0/TCG" runs the guest, the process's
// own name is the main loop that serves devices and chardevs).
func Threads(pid int) (map[string]time.Duration, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	out := map[string]time.Duration{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "stat"))
		if err != nil {
			continue // the thread exited during the walk
		}
		name, d, err := ParseStatCPU(b)
		if err != nil {
			return nil, err
		}
		out[name] += d
	}
	return out, nil
}

// ParseStatCPU extracts the command name and utime+stime from a
// /proc/PID/stat (or task stat) line.
func ParseStatCPU(b []byte) (string, time.Duration, error) {
	open := bytes.IndexByte(b, '(')
	// The name may itself hold parentheses and spaces: it ends at the last ')'.
	closing := bytes.LastIndexByte(b, ')')
	if open < 0 || closing < open || closing+2 > len(b) {
		return "", 0, fmt.Errorf("malformed stat line %q", clipStat(b))
	}
	name := string(b[open+1 : closing])
	f := strings.Fields(string(b[closing+2:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return "", 0, fmt.Errorf("short stat line %q", clipStat(b))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return "", 0, fmt.Errorf("stat line %q: bad utime/stime", clipStat(b))
	}
	return name, time.Duration(ut+st) * clockTick, nil
}

func clipStat(b []byte) string {
	if len(b) > 120 {
		b = b[:120]
	}
	return string(b)
}
