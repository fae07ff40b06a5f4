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

// QEMU's TCG (software emulation, no KVM) keeps the host code it translated
// guest code into in one buffer, code_gen_buffer. QEMU 7.2 (tcg/region.c)
// maps it at start-up as one private anonymous mapping of -accel's tb-size,
// readable, writable and executable (rwxp: split W^X is off on Linux), and
// divides it into regions, one with single-threaded TCG (the only kind
// macvm runs), each ending in a PROT_NONE guard page. In /proc/PID/smaps it
// is therefore an anonymous rwxp mapping of tb-size less one page per
// region, followed by a ---p page. Nothing else in QEMU maps anonymous
// executable memory, so those mappings are the cache. KVM and
// Virtualization.framework run guest code natively and have no such buffer.

// TBSizeArg returns the tb-size (MiB) of a QEMU command line's
// "-accel tcg,...,tb-size=N" argument, and false when the line has none
// (KVM, or QEMU's default size).
func TBSizeArg(args []string) (int, bool) {
	for i, a := range args {
		if (a != "-accel" && a != "--accel") || i+1 >= len(args) {
			continue
		}
		for _, opt := range strings.Split(args[i+1], ",") {
			if v, ok := strings.CutPrefix(opt, "tb-size="); ok {
				if n, err := strconv.Atoi(v); err == nil && n > 0 {
					return n, true
				}
			}
		}
	}
	return 0, false
}

// CodeGenBuffer reads pid's smaps and returns the memory of its TCG
// translation cache, given the tb-size (MiB) QEMU was started with.
func CodeGenBuffer(pid, tbSizeMiB int) (Usage, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return Usage{}, err
	}
	defer f.Close()
	u, err := ParseCodeGenBuffer(f, int64(tbSizeMiB)<<20)
	if err != nil {
		return Usage{}, fmt.Errorf("smaps of %d: %w", pid, err)
	}
	return u, nil
}

// maxGuardPages bounds the guard pages (one per region) that may separate
// the buffer's size from tb-size: multi-threaded TCG uses at most a few
// dozen regions.
const maxGuardPages = 512

// ParseCodeGenBuffer sums RSS, PSS and anonymous PSS of the anonymous rwxp
// mappings in smaps text, and checks that their size adds up to tbSize
// (bytes) less at most a guard page per region: anything else means the
// mappings are not (only) the translation cache, which is an error rather
// than a wrong figure.
func ParseCodeGenBuffer(r io.Reader, tbSize int64) (Usage, error) {
	var (
		u         Usage
		size      int64
		n         int
		inBuffer  bool
		pageBytes int64 = 4096
	)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if start, end, perms, path, ok := mappingHeader(line); ok {
			inBuffer = perms == "rwxp" && path == ""
			if inBuffer {
				size += end - start
				n++
			}
			continue
		}
		if !inBuffer {
			continue
		}
		name, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) != 2 || f[1] != "kB" {
			continue
		}
		v, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		switch string(name) {
		case "Rss":
			u.RSS += v << 10
		case "Pss":
			u.PSS += v << 10
		case "Pss_Anon":
			u.Anon += v << 10
		case "KernelPageSize":
			pageBytes = v << 10
		}
	}
	if err := sc.Err(); err != nil {
		return Usage{}, err
	}
	if n == 0 {
		return Usage{}, fmt.Errorf("no anonymous rwxp mapping (TCG code_gen_buffer of tb-size %d MiB)", tbSize>>20)
	}
	if size > tbSize || size < tbSize-int64(min(n, maxGuardPages))*pageBytes {
		return Usage{}, fmt.Errorf("anonymous rwxp mappings of %d bytes in %d mapping(s) do not match a TCG code_gen_buffer of tb-size %d MiB", size, n, tbSize>>20)
	}
	return u, nil
}

// mappingHeader parses an smaps mapping line
// ("7fe618800000-7fe6207ff000 rwxp 00000000 00:00 0    [path]").
func mappingHeader(line []byte) (start, end int64, perms, path string, ok bool) {
	f := strings.Fields(string(line))
	if len(f) < 5 {
		return 0, 0, "", "", false
	}
	lo, hi, found := strings.Cut(f[0], "-")
	if !found || len(f[1]) != 4 {
		return 0, 0, "", "", false
	}
	s, err1 := strconv.ParseUint(lo, 16, 64)
	e, err2 := strconv.ParseUint(hi, 16, 64)
	if err1 != nil || err2 != nil || e < s {
		return 0, 0, "", "", false
	}
	if len(f) > 5 {
		path = strings.Join(f[5:], " ")
	}
	return int64(s), int64(e), f[1], path, true
}
