package cri_test

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// The pod overhead docs/kubernetes.md declares in the RuntimeClass (overhead.podFixed). TestPodOverhead
// measures an idle pod and fails when the declaration no longer covers it.
const (
	podFixedMemoryMiB = 384
	podFixedMilliCPU  = 100
)

// TestPodOverhead measures what a macvm pod costs beyond its containers: the resident memory of its
// shim and hypervisor, and their CPU use while the pod is idle (a busybox sleep). It logs the figures
// and checks them against the RuntimeClass overhead the docs declare. runc pods have no VM to account
// for, so the test runs on the VM runtimes only.
func TestPodOverhead(t *testing.T) {
	ran := false
	for _, rt := range suite.Runtimes {
		if !rt.VM {
			continue
		}
		ran = true
		t.Run(rt.Short, func(t *testing.T) {
			d := daemon(t, rt, harness.CRIConfig{})
			podID, podPath := runPod(t, d, rt, podConfig(d, "idle"))
			id := startContainer(t, d, podID, podPath, containerConfig("idle", "sleep", "3600"))
			waitState(t, d, id, "CONTAINER_RUNNING")
			shim, err := d.CRIShimPid(podID)
			if err != nil {
				t.Fatal(err)
			}
			// Let the boot's page faults and the first stats settle.
			time.Sleep(15 * time.Second)
			procs, err := podProcs(shim)
			if err != nil {
				t.Fatal(err)
			}
			cpu0, err := cpuTicks(procs)
			if err != nil {
				t.Fatal(err)
			}
			const window = 20 * time.Second
			time.Sleep(window)
			cpu1, err := cpuTicks(procs)
			if err != nil {
				t.Fatal(err)
			}
			var rss int64
			var parts []string
			for _, p := range procs {
				kb, err := rssKiB(p)
				if err != nil {
					t.Fatal(err)
				}
				rss += kb
				parts = append(parts, fmt.Sprintf("%s %d MiB", strings.Fields(p.Cmdline + " ?")[0], kb>>10))
			}
			// USER_HZ is 100 on Linux: one tick is 10 ms of CPU.
			milli := (cpu1 - cpu0) * 10 * 1000 / window.Milliseconds()
			t.Logf("idle pod: RSS %d MiB (%s), CPU %d millicores over %v", rss>>10, strings.Join(parts, ", "), milli, window)
			if rss>>10 > podFixedMemoryMiB {
				t.Errorf("idle pod RSS %d MiB exceeds the declared overhead.podFixed memory %d Mi: update docs/kubernetes.md", rss>>10, podFixedMemoryMiB)
			}
			if milli > podFixedMilliCPU {
				t.Errorf("idle pod CPU %dm exceeds the declared overhead.podFixed cpu %dm: update docs/kubernetes.md", milli, podFixedMilliCPU)
			}
		})
	}
	if !ran {
		t.Fatalf("%s selects no VM runtime: the pod overhead is a VM's", harness.EnvRuntimes)
	}
}

// podProcs is the shim and its descendants (the VM's hypervisor and helpers).
func podProcs(shim int) ([]harness.Proc, error) {
	desc, err := harness.Descendants(shim)
	if err != nil {
		return nil, err
	}
	self, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", shim))
	if err != nil {
		return nil, err
	}
	return append([]harness.Proc{{Pid: shim, Cmdline: string(bytes.ReplaceAll(self, []byte{0}, []byte{' '}))}}, desc...), nil
}

func rssKiB(p harness.Proc) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			return strconv.ParseInt(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", p.Pid)
}

// cpuTicks sums utime+stime of procs, in clock ticks.
func cpuTicks(procs []harness.Proc) (int64, error) {
	var sum int64
	for _, p := range procs {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Pid))
		if err != nil {
			return 0, err
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
		// f[11] and f[12] are fields 14 and 15: utime, stime.
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		sum += u + s
	}
	return sum, nil
}
