package vm

import (
	"io"
	"os"
	"strings"
)

// tailFile returns up to the last n bytes of the file at path, or "" when
// it cannot be read. Backends write the guest console to a file (QEMU's
// file chardev, Virtualization.framework's file serial attachment), so
// the tail needs no goroutine copying the console and survives the
// hypervisor's exit.
func tailFile(path string, n int) string {
	if n <= 0 {
		return ""
	}
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	off := st.Size() - int64(n)
	if off < 0 {
		off = 0
	}
	buf := make([]byte, st.Size()-off)
	k, err := f.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return ""
	}
	return string(buf[:k])
}

// describeTail formats a log tail for an error message, so a boot that
// fails says why (a panic, a missing module) without a trip to the file.
func describeTail(what, tail string) string {
	tail = strings.TrimSpace(tail)
	if tail == "" {
		return what + " empty"
	}
	return what + " tail:\n" + tail
}
