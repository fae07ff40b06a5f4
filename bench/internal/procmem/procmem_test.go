package procmem

import (
	"os"
	"strings"
	"testing"
	"time"
)

const rollup = `55d0c0a00000-7ffd2b9f6000 ---p 00000000 00:00 0                          [rollup]
Rss:              149872 kB
Pss:              117001 kB
Pss_Anon:         100000 kB
Shared_Clean:      40000 kB
`

func TestParseKB(t *testing.T) {
	kv, err := ParseKB(strings.NewReader(rollup))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := kv["Rss"], int64(149872)<<10; got != want {
		t.Errorf("Rss = %d, want %d", got, want)
	}
	if got, want := kv["Pss"], int64(117001)<<10; got != want {
		t.Errorf("Pss = %d, want %d", got, want)
	}
	if _, ok := kv["55d0c0a00000-7ffd2b9f6000 ---p 00000000 00"]; ok {
		t.Error("the address header was parsed as a value")
	}
	kv, err = ParseKB(strings.NewReader("Rss: 12 MB\nUid:\t0\t0\t0\t0\nThreads: 4\n"))
	if err != nil || len(kv) != 0 {
		t.Errorf("lines that are not kB sizes parsed as %v, %v; want none", kv, err)
	}
}

func TestMeminfo(t *testing.T) {
	m, err := ParseMeminfo([]byte("MemTotal:        500000 kB\nMemFree:   1 kB\nMemAvailable:    400000 kB\nHugePages_Total:       0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := m.Used(), int64(100000)<<10; got != want {
		t.Errorf("Used = %d, want %d", got, want)
	}
	if _, err := ParseMeminfo([]byte("MemTotal: 1 kB\n")); err == nil {
		t.Error("meminfo without MemAvailable accepted")
	}
}

func TestStatusRSS(t *testing.T) {
	got, err := StatusRSS([]byte("Name:\tsleep\nState:\tS (sleeping)\nVmRSS:\t    1024 kB\n"))
	if err != nil || got != 1<<20 {
		t.Errorf("StatusRSS = %d, %v; want %d", got, err, 1<<20)
	}
}

// TestOfSelf reads this test process's own rollup: RSS is positive, PSS
// never exceeds it, and the anonymous part (a Go heap: some) never exceeds
// PSS.
func TestOfSelf(t *testing.T) {
	u, err := Of(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if u.RSS <= 0 || u.PSS <= 0 || u.PSS > u.RSS {
		t.Errorf("own usage %+v: want 0 < PSS <= RSS", u)
	}
	if rollup, _ := os.ReadFile("/proc/self/smaps_rollup"); strings.Contains(string(rollup), "Pss_Anon:") && (u.Anon <= 0 || u.Anon > u.PSS) {
		t.Errorf("own usage %+v: want 0 < Anon <= PSS", u)
	}
	if _, err := Host(); err != nil {
		t.Errorf("Host: %v", err)
	}
}

func TestParseStatCPU(t *testing.T) {
	line := []byte("4242 (CPU 0/TCG) R 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0 100 0 0\n")
	name, d, err := ParseStatCPU(line)
	if err != nil || name != "CPU 0/TCG" || d != 1750*time.Millisecond {
		t.Errorf("ParseStatCPU = %q, %v, %v; want CPU 0/TCG, 1.75s", name, d, err)
	}
	if _, _, err := ParseStatCPU([]byte("4242 (x) R 1")); err == nil {
		t.Error("short stat line accepted")
	}
}

// TestCPUSelf burns CPU and sees its own CPU time grow by 50ms. It spins
// until then rather than for a fixed wall time: on a loaded machine 300ms
// of wall time gave as little as 10ms of CPU.
func TestCPUSelf(t *testing.T) {
	before, err := CPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		for spin := time.Now().Add(10 * time.Millisecond); time.Now().Before(spin); {
		}
		after, err := CPU(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		if after-before >= 50*time.Millisecond {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("2 minutes of spinning showed as %v of CPU", after-before)
		}
	}
	th, err := Threads(os.Getpid())
	if err != nil || len(th) == 0 {
		t.Errorf("Threads = %v, %v", th, err)
	}
}
