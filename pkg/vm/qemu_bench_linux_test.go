package vm

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/pkg/bootimage"
)

// BenchmarkBootInterleaved measures qemu exec -> first line from /init
// for initramfs variants, one boot of each per round so that the noise of
// a shared machine hits all variants alike; it reports each variant's
// median. Run: go test -run '^$' -bench BootInterleaved -benchtime 5x ./pkg/vm
func BenchmarkBootInterleaved(b *testing.B) {
	kernel := testKernel(&testing.T{})
	if _, err := os.Stat(kernel); err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	base := testInitrd(&testing.T{}, kernel) // builds testinit
	initBin := filepath.Join(filepath.Dir(base), "testinit")
	all, err := bootimage.ReadModuleDir(filepath.Join(filepath.Dir(kernel), "modules"))
	if err != nil {
		b.Fatal(err)
	}
	var channelOnly []*bootimage.Module
	for _, m := range all {
		switch m.Name {
		case "virtio", "virtio_ring", "virtio_mmio", "virtio_console":
			channelOnly = append(channelOnly, m)
		}
	}
	variants := []struct {
		name string
		spec bootimage.InitrdSpec
	}{
		{"all-modules-plain", bootimage.InitrdSpec{Init: initBin, Modules: all, Compression: bootimage.CompressNone}},
		{"all-modules-gzip", bootimage.InitrdSpec{Init: initBin, Modules: all, Compression: bootimage.CompressGzip}},
		{"channel-modules-plain", bootimage.InitrdSpec{Init: initBin, Modules: channelOnly, Compression: bootimage.CompressNone}},
	}
	paths := make([]string, len(variants))
	for i, v := range variants {
		paths[i] = filepath.Join(dir, v.name+".img")
		f, err := os.Create(paths[i])
		if err != nil {
			b.Fatal(err)
		}
		if err := bootimage.WriteInitrd(f, v.spec); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}

	// Wall time depends on what else runs on the machine; qemu's CPU time
	// to the same point much less so.
	times := make([][]time.Duration, len(variants))
	cpu := make([][]time.Duration, len(variants))
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		for i := range variants {
			wall, c := bootOnce(b, kernel, paths[i])
			times[i] = append(times[i], wall)
			cpu[i] = append(cpu[i], c)
		}
	}
	b.StopTimer()
	median := func(ts []time.Duration) time.Duration {
		ts = append([]time.Duration{}, ts...)
		sort.Slice(ts, func(a, c int) bool { return ts[a] < ts[c] })
		return ts[len(ts)/2]
	}
	for i, v := range variants {
		b.ReportMetric(float64(median(times[i]).Milliseconds()), "wall-ms-"+v.name)
		b.ReportMetric(float64(median(cpu[i]).Milliseconds()), "qemu-cpu-ms-"+v.name)
		b.Logf("%s: wall %v, qemu cpu %v", v.name, times[i], cpu[i])
	}
}

// processCPU returns the user+system CPU time pid has used so far.
func processCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// Fields after the command: state is f[0], utime f[11], stime f[12].
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

func bootOnce(b *testing.B, kernel, initrd string) (wall, cpu time.Duration) {
	m, err := NewQEMU(Config{ID: "bench", StateDir: b.TempDir(), Kernel: kernel, Initrd: initrd, KernelArgs: []string{"macvm.test=hello"}})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	defer func() {
		kill, c := context.WithCancel(context.Background())
		c()
		_ = m.Stop(kill)
	}()
	if err := m.Start(ctx); err != nil {
		b.Fatal(err)
	}
	conn, err := m.AgentConn(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(bootTimeout))
	if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
		b.Fatal(err)
	}
	wall = time.Since(m.BootStarted())
	cpu = processCPU(m.Pid())
	_, _ = conn.Write([]byte("poweroff\n"))
	select {
	case <-m.Done():
	case <-time.After(30 * time.Second):
	}
	return wall, cpu
}
