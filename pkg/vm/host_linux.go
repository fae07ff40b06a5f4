package vm

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// kvmUsable reports whether /dev/kvm exists and answers with the stable
// API version; a node we cannot open (no permission, nested virt off)
// means TCG.
func kvmUsable() bool {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion = 0xAE00 // _IO(KVMIO, 0x00)
	v, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	return err == nil && v == 12
}

var (
	tscOnce sync.Once
	tscKHz  int
)

// HostTSCKHz returns the host's TSC frequency in kHz, or 0 if unknown.
// Under TCG the guest's TSC is the host's, and a microvm guest (no PIT to
// calibrate against) must be told its rate or may hang in calibration.
// The host does not change its TSC rate, so it is looked up once.
func HostTSCKHz() int {
	tscOnce.Do(func() { tscKHz = lookupTSCKHz() })
	return tscKHz
}

func lookupTSCKHz() int {
	// Exposed by some kernels (and hypervisors' guest kernels).
	if b, err := os.ReadFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && v > 0 {
			return v
		}
	}
	// What the host kernel itself measured, while its log still holds the
	// boot messages. "cpu MHz" below is the current clock of a scaling
	// CPU, which is not the TSC rate on bare metal.
	if n, err := unix.Klogctl(unix.SYSLOG_ACTION_SIZE_BUFFER, nil); err == nil && n > 0 {
		buf := make([]byte, n)
		if n, err := unix.Klogctl(unix.SYSLOG_ACTION_READ_ALL, buf); err == nil {
			if khz := tscKHzFromLog(string(buf[:n])); khz > 0 {
				return khz
			}
		}
	}
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 {
			return 0
		}
		return int(mhz * 1000)
	}
	return 0
}

// tscKHzFromLog finds the host kernel's TSC rate in its log: the refined
// calibration when there is one, else the first estimate.
func tscKHzFromLog(log string) int {
	detected := 0
	for _, line := range strings.Split(log, "\n") {
		for _, marker := range []string{"tsc: Refined TSC clocksource calibration: ", "tsc: Detected "} {
			i := strings.Index(line, marker)
			if i < 0 {
				continue
			}
			f := strings.Fields(line[i+len(marker):])
			if len(f) < 2 || f[1] != "MHz" {
				continue
			}
			mhz, err := strconv.ParseFloat(f[0], 64)
			if err != nil || mhz <= 0 {
				continue
			}
			if strings.HasPrefix(marker, "tsc: Refined") {
				return int(mhz*1000 + 0.5)
			}
			if detected == 0 {
				detected = int(mhz*1000 + 0.5)
			}
		}
	}
	return detected
}
