package guest_test

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// checkQEMUMemory checks how a running qemu was set up to keep its own
// memory small (pkg/vm/qemu_mem_linux.go, qemu_args.go): transparent huge
// pages off, one malloc arena, and a TCG translation cache capped at
// cacheMiB (QEMU's default is 1 GiB). It logs the qemu's PSS, split into
// anonymous (private to this VM) and file pages, for the record.
func checkQEMUMemory(t *testing.T, pid, cacheMiB int) {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "\nTHP_enabled:\t0\n") {
		t.Errorf("qemu %d runs with transparent huge pages enabled:\n%s", pid, status)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains("\x00"+string(env), "\x00MALLOC_ARENA_MAX=1\x00") {
		t.Errorf("qemu %d runs without MALLOC_ARENA_MAX=1", pid)
	}

	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(cmdline), "\x00-accel\x00kvm\x00") {
		cacheMiB = 0 // no translation cache under KVM
	}
	// The translation cache is QEMU's anonymous executable memory (one
	// mapping per region of it, split by guard pages).
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cache uint64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 5 || !strings.Contains(fields[1], "x") {
			continue
		}
		var lo, hi uint64
		if _, err := fmt.Sscanf(fields[0], "%x-%x", &lo, &hi); err != nil {
			t.Fatalf("maps line %q: %v", sc.Text(), err)
		}
		cache += hi - lo
	}
	if cacheMiB == 0 && cache != 0 || cacheMiB != 0 && (cache == 0 || cache > uint64(cacheMiB)<<20) {
		t.Errorf("qemu %d: %d bytes of anonymous executable mappings, want at most %d MiB (the TCG cache)", pid, cache, cacheMiB)
	}

	rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	kb := map[string]int{}
	for _, l := range strings.Split(string(rollup), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			if n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB")); err == nil {
				kb[k] = n
			}
		}
	}
	t.Logf("qemu %d: PSS %.1f MiB (anonymous %.1f, file %.1f), RSS %.1f MiB", pid,
		float64(kb["Pss"])/1024, float64(kb["Pss_Anon"])/1024, float64(kb["Pss_File"])/1024, float64(kb["Rss"])/1024)
}
