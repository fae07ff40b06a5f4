package seccomp

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Install loads p as a seccomp filter of the calling thread. The caller
// must hold CAP_SYS_ADMIN or have set no_new_privs, and must be locked to
// the thread that will execve (the filter is per thread and survives
// execve; the exec'd program inherits it).
func Install(p *Program) error {
	if p == nil {
		return nil
	}
	ins := p.Instructions()
	if len(ins) == 0 {
		return fmt.Errorf("seccomp: empty filter")
	}
	filter := make([]unix.SockFilter, len(ins))
	for i, r := range ins {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	_, _, errno := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, uintptr(p.Flags), uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(filter)
	if errno != 0 {
		return fmt.Errorf("install seccomp filter (%d instructions): %w", len(filter), errno)
	}
	return nil
}
