package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine stamps a result with what it was measured on.
type Machine struct {
	Date       time.Time `json:"date"`
	Hostname   string    `json:"hostname"`
	Cores      int       `json:"cores"`
	CPU        string    `json:"cpu"`
	MemoryGiB  float64   `json:"memory_gib"`
	HostKernel string    `json:"host_kernel"`
	// Accel is "KVM" when /dev/kvm can be opened, otherwise "TCG" (QEMU's
	// software emulation), which is what decides the VM figures most.
	Accel      string `json:"accel"`
	QEMU       string `json:"qemu"`
	Runc       string `json:"runc"`
	Containerd string `json:"containerd"`
	Commit     string `json:"commit"`
	Go         string `json:"go"`
	// LoadStart and LoadEnd are the 1-minute load averages when the run
	// began and ended: other work on a shared machine slows TCG guests far
	// more than runc, and the reader should know how busy it was.
	LoadStart float64 `json:"load_start"`
	LoadEnd   float64 `json:"load_end"`
}

// loadAvg returns the 1-minute load average (0 if unreadable).
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	var l float64
	fmt.Sscanf(string(b), "%f", &l)
	return l
}

func probeMachine(binDir string) (Machine, error) {
	m := Machine{Date: time.Now().UTC(), Cores: runtime.NumCPU(), Go: runtime.Version(), LoadStart: loadAvg()}
	m.Hostname, _ = os.Hostname()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return m, err
	}
	m.HostKernel = unix.ByteSliceToString(u.Release[:]) + " " + unix.ByteSliceToString(u.Machine[:])
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if mi, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb float64
		if _, err := fmt.Sscanf(string(mi), "MemTotal: %f kB", &kb); err == nil {
			m.MemoryGiB = kb / (1 << 20)
		}
	}
	m.Accel = "TCG"
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		m.Accel = "KVM"
	}
	m.QEMU = firstLine("qemu-system-" + qemuArch() + " --version")
	m.Runc = firstLine("runc --version")
	m.Containerd = firstLine(filepath.Join(binDir, "containerd") + " --version")
	commit := firstLine("git rev-parse --short HEAD")
	if commit != "" && firstLine("git status --porcelain --untracked-files=no") != "" {
		commit += " (with uncommitted changes)"
	}
	m.Commit = commit
	return m, nil
}

func qemuArch() string {
	if runtime.GOARCH == "arm64" {
		return "aarch64"
	}
	return "x86_64"
}

// firstLine runs a command line (split on spaces) and returns the first
// line of its output, or "" when it fails: a missing version is shown as
// unknown, it does not stop the benchmark.
func firstLine(cmdline string) string {
	f := strings.Fields(cmdline)
	out, err := exec.Command(f[0], f[1:]...).Output()
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(line)
}

// kernelVersion finds the "Linux version ..." banner in an uncompressed
// kernel image, which names the exact kernel a VM variant boots.
func kernelVersion(vmlinux string) (string, error) {
	b, err := os.ReadFile(vmlinux)
	if err != nil {
		return "", fmt.Errorf("guest kernel: %w", err)
	}
	return findBanner(b)
}

func findBanner(b []byte) (string, error) {
	const marker = "Linux version "
	for off := 0; ; {
		i := bytes.Index(b[off:], []byte(marker))
		if i < 0 {
			return "", fmt.Errorf("no Linux version banner found")
		}
		start := off + i + len(marker)
		end := bytes.IndexAny(b[start:], "\x00\n")
		if end < 0 {
			end = len(b) - start
		}
		v := strings.TrimSpace(string(b[start : start+end]))
		// The image also holds format strings ("Linux version %s ..."); the banner has a real version.
		if v != "" && !strings.Contains(v, "%") {
			return shortBanner(v), nil
		}
		off = start
	}
}

// moduleRoot is the directory holding go.mod, where `go test` of the micro
// benchmarks runs.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod above %s: run from the repository", dir)
		}
	}
}

// shortBanner keeps the release and the build tag of a banner
// ("6.1.0-56-amd64 (builder@host) (gcc ...) #1 SMP Debian 6.1.192-2 (date)"
// becomes "6.1.0-56-amd64 #1 SMP Debian 6.1.192-2 (date)"): the compiler
// details say nothing about what is measured.
func shortBanner(v string) string {
	release, rest, _ := strings.Cut(v, " ")
	if i := strings.Index(rest, "#"); i >= 0 {
		return release + " " + rest[i:]
	}
	return release
}
