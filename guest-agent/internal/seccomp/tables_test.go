package seccomp

import (
	"testing"

	"github.com/elastic/go-seccomp-bpf/arch"
)

// TestTablesMatchLibrary: zsyscalls.go is go-seccomp-bpf's tables, as
// pinned in go.mod (run `make generate` after changing the version).
func TestTablesMatchLibrary(t *testing.T) {
	for _, c := range []struct {
		table *archTable
		info  *arch.Info
	}{
		{&tableX86_64, arch.X86_64}, {&tableI386, arch.I386}, {&tableX32, arch.X32},
		{&tableAARCH64, arch.AARCH64}, {&tableARM, arch.ARM},
	} {
		// The highest number of each name (see gen's highestNumbers).
		want := map[string]int{}
		for nr, name := range c.info.SyscallNumbers {
			want[name] = max(want[name], nr)
		}
		if c.table.audit != uint32(c.info.ID) || c.table.name != c.info.Name || len(c.table.syscalls) != len(want) {
			t.Errorf("%s: table %s/%#x with %d syscalls, library %s/%#x with %d: stale, run make generate", c.info.Name,
				c.table.name, c.table.audit, len(c.table.syscalls), c.info.Name, uint32(c.info.ID), len(want))
			continue
		}
		for name, nr := range want {
			if c.table.x32 {
				nr |= x32Bit
			}
			if got, ok := c.table.lookup(name); !ok || got != nr {
				t.Errorf("%s %s: table %d (%v), library %d", c.info.Name, name, got, ok, nr)
			}
		}
	}
}
