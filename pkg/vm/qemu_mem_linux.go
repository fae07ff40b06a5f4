package vm

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// How a qemu process is started so that its own memory (not the guest's)
// stays small; measured on template clones running an idle container
// (per-mapping smaps, TCG, Debian kernel): together ~3-5 MiB of private
// memory less per VM, exec and stdout not slower (A/B in one run, three
// rounds: 0.12-0.15 s of QEMU CPU per `exec true` either way).

// qemuMallocArenas is glibc's MALLOC_ARENA_MAX for qemu. Every qemu thread
// that allocates (main loop, vCPU, RCU, the 9p and block worker pools)
// otherwise gets an arena of its own, each keeping freed memory: with one
// arena a clone's heap was 2 MiB larger but its other anonymous memory
// 5.3 MiB smaller.
const qemuMallocArenas = "1"

// qemuEnv is the environment qemu runs with: the caller's, plus
// MALLOC_ARENA_MAX unless the caller set it.
func qemuEnv() []string {
	env := os.Environ()
	if _, ok := os.LookupEnv("MALLOC_ARENA_MAX"); !ok {
		env = append(env, "MALLOC_ARENA_MAX="+qemuMallocArenas)
	}
	return env
}

var noHugePagesOnce sync.Once

// noHugePages turns transparent huge pages off for this process and so,
// inherited across fork and exec, for the qemu it starts next. QEMU asks
// for huge pages (MADV_HUGEPAGE) on some of its own buffers, where a 2 MiB
// page is charged whole however little of it is used: a clone had 2 MiB
// of such memory it did not need. The translation cache, madvised too,
// measured the same with 4 KiB pages (it is filled densely). The flag is
// per process, so it covers the shim or the pool daemon too: with THP in
// "madvise" mode (Debian's default) that changes nothing for them, with
// "always" their Go heap uses 4 KiB pages. A failure (a kernel without
// THP) is ignored: qemu then runs as before.
func noHugePages() {
	noHugePagesOnce.Do(func() {
		_ = unix.Prctl(unix.PR_SET_THP_DISABLE, 1, 0, 0, 0)
	})
}
