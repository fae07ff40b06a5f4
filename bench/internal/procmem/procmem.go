// Package procmem reads memory figures of host processes and of a guest's
// /proc/meminfo. RSS counts every resident page a process maps, shared ones
// included; PSS divides each shared page among the processes mapping it, so
// the PSS of N hypervisors adds up to what they really cost together. Both
// come from /proc/PID/smaps_rollup, one read per process. Anon, the PSS of
// anonymous pages, is what a process holds for itself: for a hypervisor its
// heap, the TCG translation cache and the guest pages it has written, but not
// the file pages it maps (a warm-start template's RAM, QEMU's binary and
// libraries), which are shared with every process mapping them.
package procmem

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Usage is a process's resident memory in bytes.
type Usage struct {
	RSS, PSS int64
	// Anon is smaps_rollup's Pss_Anon (Linux 5.13+; 0 before).
	Anon int64
}

// Add sums two usages (for totals over several processes).
func (u Usage) Add(v Usage) Usage {
	return Usage{RSS: u.RSS + v.RSS, PSS: u.PSS + v.PSS, Anon: u.Anon + v.Anon}
}

// Of reads pid's smaps_rollup.
func Of(pid int) (Usage, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Usage{}, err
	}
	defer f.Close()
	kv, err := ParseKB(f)
	if err != nil {
		return Usage{}, fmt.Errorf("smaps_rollup of %d: %w", pid, err)
	}
	rss, ok1 := kv["Rss"]
	pss, ok2 := kv["Pss"]
	if !ok1 || !ok2 {
		return Usage{}, fmt.Errorf("smaps_rollup of %d has no Rss/Pss", pid)
	}
	return Usage{RSS: rss, PSS: pss, Anon: kv["Pss_Anon"]}, nil
}

// ParseKB parses "Name:   123 kB" lines (smaps_rollup, meminfo, status)
// into bytes by name. Lines of another shape (the rollup's address header,
// status's text fields and id lists, unitless counters) are skipped.
func ParseKB(r io.Reader) (map[string]int64, error) {
	out := map[string]int64{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			// smaps_rollup's address header ("0040-7ffd ---p 00:00 0 [rollup]").
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		// Only "N kB" is a memory size; counters (HugePages_Total) and
		// lists (status's Uid) are skipped.
		if len(f) == 2 && f[1] == "kB" {
			out[strings.TrimSpace(name)] = n << 10
		}
	}
	return out, sc.Err()
}

// Meminfo is the part of /proc/meminfo the benchmark reports.
type Meminfo struct {
	Total, Available int64
}

// Used is what the kernel cannot hand out without reclaiming: total minus
// available (the figure `free` prints as used+shared-ish, without page cache
// that can be dropped).
func (m Meminfo) Used() int64 { return m.Total - m.Available }

// ParseMeminfo reads MemTotal and MemAvailable from /proc/meminfo text.
func ParseMeminfo(b []byte) (Meminfo, error) {
	kv, err := ParseKB(bytes.NewReader(b))
	if err != nil {
		return Meminfo{}, err
	}
	total, ok1 := kv["MemTotal"]
	avail, ok2 := kv["MemAvailable"]
	if !ok1 || !ok2 {
		return Meminfo{}, fmt.Errorf("meminfo without MemTotal/MemAvailable: %q", clip(b))
	}
	return Meminfo{Total: total, Available: avail}, nil
}

// Host reads the host's /proc/meminfo.
func Host() (Meminfo, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return Meminfo{}, err
	}
	return ParseMeminfo(b)
}

// StatusRSS reads VmRSS from /proc/PID/status text (what `ps` shows as RSS).
func StatusRSS(status []byte) (int64, error) {
	kv, err := ParseKB(bytes.NewReader(status))
	if err != nil {
		return 0, err
	}
	v, ok := kv["VmRSS"]
	if !ok {
		return 0, fmt.Errorf("no VmRSS in status: %q", clip(status))
	}
	return v, nil
}

func clip(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}
