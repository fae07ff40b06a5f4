//go:build linux

// Command smoke-init is a throwaway PID 1 for checking a guest kernel: it is
// packed as /init by hack/boot-kernel.sh, reports on the serial console
// whether the kernel offers what the guest agent relies on, and powers off.
// It exists so a kernel config can be judged in seconds, without the agent,
// the shim or containerd: a missing option shows up here as a named check.
//
// Console protocol (read by hack/boot-kernel.sh):
//
//	SMOKE: init uptime=SECONDS       first line, as early as possible
//	SMOKE: check NAME ok|FAIL DETAIL one line per check
//	SMOKE: ready uptime=SECONDS      every check done
//	SMOKE OK | SMOKE FAIL: N checks  verdict, then power-off
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// portName is the virtio-serial port the QEMU backend creates for the agent
// (kernel command line contract: macvm.channel=serial:agent).
const portName = "agent"

// shareTag is the 9p mount tag hack/boot-kernel.sh exports with a file
// named hello.txt in it.
const shareTag = "smoke"

// wantFilesystems are the filesystem types the agent and containers mount.
var wantFilesystems = []string{"proc", "sysfs", "devtmpfs", "tmpfs", "cgroup2", "9p", "ext4", "overlay", "erofs", "fuse", "virtiofs", "mqueue", "devpts"}

// wantControllers are the cgroup v2 controllers the agent enables for containers.
var wantControllers = []string{"cpuset", "cpu", "io", "memory", "pids"}

// wantNamespaces are the namespaces an OCI spec may ask for.
var wantNamespaces = []string{"pid", "mnt", "uts", "ipc", "net", "user", "cgroup"}

func main() {
	// /proc first, so the first line can carry the kernel's uptime.
	procErr := unix.Mount("proc", "/proc", "proc", 0, "")
	say("init uptime=%s", uptime())
	failed := 0
	check := func(name string, err error) {
		if err != nil {
			failed++
			say("check %s FAIL %v", name, err)
			return
		}
		say("check %s ok", name)
	}

	check("mounts", errors.Join(procErr, mountBase()))
	check("modules", loadModules("/lib/modules/load.list"))
	check("filesystems", missing("filesystems", readFilesystems, wantFilesystems))
	check("virtio-port", greetPort(portName))
	check("9p", readShare(shareTag))
	check("cgroup2", cgroupControllers())
	check("namespaces", namespaces())
	check("psi", exists("/proc/pressure/cpu", "/proc/pressure/memory", "/proc/pressure/io"))
	check("pty", openPty())
	check("entropy", entropy())
	say("ready uptime=%s", uptime())
	if failed > 0 {
		fmt.Printf("SMOKE FAIL: %d checks\n", failed)
	} else {
		fmt.Println("SMOKE OK")
	}
	unix.Sync()
	// PID 1 must not exit (the kernel would panic): power off, and if that
	// fails, reboot, which QEMU's -no-reboot turns into an exit too.
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	say("power off: %v", err)
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}

func say(format string, args ...any) {
	fmt.Printf("SMOKE: "+format+"\n", args...)
}

// uptime reads the kernel's clock since boot, so the console shows how much
// of the boot was the kernel's and how much the host's (QEMU start-up).
func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func mountBase() error {
	mounts := []struct{ src, dst, fstype string }{
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/tmp", "tmpfs"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2"},
		{"devpts", "/dev/pts", "devpts"},
		{"mqueue", "/dev/mqueue", "mqueue"},
	}
	var errs []error
	for _, m := range mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mount %s: %w", m.dst, err))
		}
	}
	return errors.Join(errs...)
}

// loadModules loads the initramfs's modules in list order, as the agent
// does, so a modular kernel can be measured on the same footing as the
// minimal one. No list (the minimal kernel needs none) is not an error.
func loadModules(list string) error {
	b, err := os.ReadFile(list)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	n := 0
	for _, p := range strings.Fields(string(b)) {
		if !filepath.IsAbs(p) {
			p = filepath.Join(filepath.Dir(list), p)
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load %s: %w", p, err)
		}
		n++
	}
	say("loaded %d modules", n)
	return nil
}

func readFilesystems() ([]string, error) {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return nil, err
	}
	return parseFilesystems(string(b)), nil
}

// parseFilesystems returns the type names in /proc/filesystems, whose lines
// are "nodev\tNAME" or "\tNAME".
func parseFilesystems(s string) []string {
	var names []string
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 {
			names = append(names, f[len(f)-1])
		}
	}
	return names
}

// missing reports which of want the list read by have lacks.
func missing(what string, have func() ([]string, error), want []string) error {
	got, err := have()
	if err != nil {
		return err
	}
	if m := difference(want, got); len(m) > 0 {
		return fmt.Errorf("%s missing: %s (have: %s)", what, strings.Join(m, " "), strings.Join(got, " "))
	}
	return nil
}

// difference returns the elements of want that are not in got, in want's order.
func difference(want, got []string) []string {
	have := make(map[string]bool, len(got))
	for _, g := range got {
		have[g] = true
	}
	var m []string
	for _, w := range want {
		if !have[w] {
			m = append(m, w)
		}
	}
	return m
}

// greetPort finds the named virtio-serial port the way the agent must
// (no udev: /sys/class/virtio-ports/*/name) and writes a line to it, which
// the host reads from the port's chardev file.
func greetPort(name string) error {
	// A port's sysfs entry appears when its driver probes, which for a
	// modular kernel can trail the module load slightly.
	deadline := time.Now().Add(2 * time.Second)
	for {
		dev, err := findPort("/sys/class/virtio-ports", name)
		if err == nil {
			f, err := os.OpenFile("/dev/"+dev, os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = fmt.Fprintf(f, "hello from %s\n", dev)
			return err
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func findPort(class, name string) (string, error) {
	names, _ := filepath.Glob(filepath.Join(class, "*", "name"))
	for _, p := range names {
		b, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(b)) == name {
			return filepath.Base(filepath.Dir(p)), nil
		}
	}
	return "", fmt.Errorf("no virtio port named %q among %d ports in %s", name, len(names), class)
}

func readShare(tag string) error {
	dir := "/mnt/" + tag
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(tag, dir, "9p", 0, "trans=virtio,version=9p2000.L,msize=512000"); err != nil {
		return fmt.Errorf("mount 9p %s: %w", tag, err)
	}
	defer unix.Unmount(dir, 0)
	b, err := os.ReadFile(filepath.Join(dir, "hello.txt"))
	if err != nil {
		return err
	}
	say("9p says %q", strings.TrimSpace(string(b)))
	return nil
}

func cgroupControllers() error {
	return missing("controllers", func() ([]string, error) {
		b, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers")
		return strings.Fields(string(b)), err
	}, wantControllers)
}

func namespaces() error {
	var paths []string
	for _, ns := range wantNamespaces {
		paths = append(paths, "/proc/self/ns/"+ns)
	}
	return exists(paths...)
}

func exists(paths ...string) error {
	var errs []error
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func openPty() error {
	f, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.TIOCGPTN)
	if err != nil {
		return err
	}
	say("pty /dev/pts/%d", n)
	return nil
}

// entropy checks the pool is initialised without blocking: Go's
// crypto/rand would otherwise stall the agent (seen with plain qemu64).
func entropy() error {
	b := make([]byte, 16)
	if _, err := unix.Getrandom(b, unix.GRND_NONBLOCK); err != nil {
		return fmt.Errorf("getrandom: %w (entropy pool not initialised)", err)
	}
	return nil
}
