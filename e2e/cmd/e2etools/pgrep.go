package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// pgrep [-f] [-x] PATTERN: prints the PIDs of the processes (other than itself) whose name, or with -f
// whole command line, matches the extended regular expression PATTERN; exit status 1 when none does.
func pgrep(args []string) int {
	full, exact := false, false
	var pattern string
	for _, a := range args {
		switch {
		case a == "-f":
			full = true
		case a == "-x":
			exact = true
		case strings.HasPrefix(a, "-") && pattern == "":
			return fail("pgrep", 2, "unsupported option %q (usage: pgrep [-f] [-x] PATTERN)", a)
		case pattern == "":
			pattern = a
		default:
			return fail("pgrep", 2, "only one pattern can be provided")
		}
	}
	if pattern == "" {
		return fail("pgrep", 2, "no matching criteria specified")
	}
	if exact {
		pattern = "^(?:" + pattern + ")$"
	}
	re, err := regexp.Compile(pattern)
	if err != nil {
		return fail("pgrep", 2, "invalid pattern %q: %v", pattern, err)
	}
	pids, err := matchingPids(re, full)
	if err != nil {
		return fail("pgrep", 3, "%v", err)
	}
	for _, p := range pids {
		fmt.Println(p)
	}
	if len(pids) == 0 {
		return 1
	}
	return 0
}

// matchingPids scans /proc. A process that exits during the scan is skipped.
func matchingPids(re *regexp.Regexp, full bool) ([]int, error) {
	dirs, err := filepath.Glob("/proc/[0-9]*")
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	var pids []int
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == self {
			continue
		}
		var subject string
		if full {
			b, err := os.ReadFile(filepath.Join(d, "cmdline"))
			if err != nil {
				continue
			}
			subject = string(bytes.TrimRight(bytes.ReplaceAll(b, []byte{0}, []byte{' '}), " "))
		}
		if subject == "" { // without -f, or a kernel thread (no command line): its name

			b, err := os.ReadFile(filepath.Join(d, "comm"))
			if err != nil {
				continue
			}
			subject = strings.TrimSuffix(string(b), "\n")
		}
		if re.MatchString(subject) {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids, nil
}
