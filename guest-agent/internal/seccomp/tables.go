package seccomp

import (
	"slices"
	"strings"
)

//go:generate go run ./gen

// archTable is one architecture's syscall numbers (zsyscalls.go).
type archTable struct {
	// name is libseccomp's, audit the AUDIT_ARCH_* value seccomp_data
	// carries.
	name  string
	audit uint32
	// x32 marks the x32 ABI: x86_64's audit value, numbers with x32Bit.
	x32      bool
	syscalls []sysNum // sorted by name
}

type sysNum struct {
	name string
	nr   int
}

// lookup returns the number of the syscall called name, as seccomp_data
// carries it (with the x32 bit for x32).
func (t *archTable) lookup(name string) (int, bool) {
	i, ok := slices.BinarySearchFunc(t.syscalls, name, func(s sysNum, n string) int { return strings.Compare(s.name, n) })
	if !ok {
		return 0, false
	}
	nr := t.syscalls[i].nr
	if t.x32 {
		nr |= x32Bit
	}
	return nr, true
}
