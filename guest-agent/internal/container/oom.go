package container

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// watchOOM calls onOOM each time the oom_kill counter of the cgroup's
// memory.events grows, until the returned stop is called. It uses inotify
// (the kernel notifies modifications of memory.events) through a
// non-blocking fd so stop can interrupt the read.
func watchOOM(cgPath string, onOOM func()) (stop func()) {
	events := filepath.Join(cgPath, "memory.events")
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return func() {}
	}
	if _, err := unix.InotifyAddWatch(fd, events, unix.IN_MODIFY); err != nil {
		unix.Close(fd)
		return func() {}
	}
	f := os.NewFile(uintptr(fd), "inotify")
	last := readOOMKills(events)
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := f.Read(buf); err != nil {
				return
			}
			n := readOOMKills(events)
			if n > last {
				onOOM()
			}
			if n > last || n < last {
				last = n
			}
		}
	}()
	return func() { f.Close() }
}

// readOOMKills returns the oom_kill count of a memory.events file (0 if it
// cannot be read).
func readOOMKills(path string) uint64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return parseOOMKills(b)
}

func parseOOMKills(b []byte) uint64 {
	s := bufio.NewScanner(bytes.NewReader(b))
	for s.Scan() {
		k, v, ok := bytes.Cut(s.Bytes(), []byte(" "))
		if ok && string(k) == "oom_kill" {
			n, _ := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 64)
			return n
		}
	}
	return 0
}
