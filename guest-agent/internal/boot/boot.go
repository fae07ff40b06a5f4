// Package boot does what an init system does before the agent can serve:
// the agent is the guest's PID 1 straight out of the initramfs, so nobody
// else mounts the pseudo filesystems, loads the kernel modules the channel
// and the shares need, brings up loopback or powers the machine off.
package boot

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CgroupRoot is where the unified cgroup hierarchy is mounted.
const CgroupRoot = "/sys/fs/cgroup"

// ModulesDir holds the kernel modules in the initramfs, with load.list
// giving their load order.
const ModulesDir = "/lib/modules"

// wantedControllers are delegated to child cgroups: what containers need for
// resource limits, stats and cpusets. Missing ones are skipped (a minimal
// kernel may lack io or cpuset).
var wantedControllers = []string{"cpu", "cpuset", "io", "memory", "pids"}

type mountPoint struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	mode                   os.FileMode
}

// earlyMounts are the filesystems every Linux userland assumes. /dev/pts is a
// new instance with a world-usable ptmx so the agent can allocate ptys.
var earlyMounts = []mountPoint{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", 0o755},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", 0o755},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
	{"cgroup2", CgroupRoot, "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate", 0o555},
}

// Logf is how boot reports progress; the agent passes its logger.
type Logf func(format string, args ...any)

// Init prepares the guest: mounts, cgroups, loopback. Only fatal problems
// are returned; missing optional pieces are logged. Kernel modules are the
// caller's (see LoadModulesAsync): they are the slow part of a boot.
func Init(logf Logf) error {
	// The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT);
	// every mount tolerates EBUSY for that reason.
	for _, m := range earlyMounts {
		if err := mountOnce(m); err != nil {
			if m.fstype == "cgroup2" {
				logf("boot: cgroup2 unavailable: %v", err)
				continue
			}
			return err
		}
	}
	ensureStdio()
	// /run is shared: a container helper started ahead of its container
	// (the agent's spare) sees what the agent mounts there later, the
	// container's root among it. Helpers make their copy private at once.
	if err := unix.Mount("", "/run", "", unix.MS_SHARED, ""); err != nil {
		logf("boot: make /run shared: %v", err)
	}
	// /dev/ptmx must reach the devpts instance the agent mounted.
	_ = os.Remove("/dev/ptmx")
	if err := os.Symlink("pts/ptmx", "/dev/ptmx"); err != nil {
		logf("boot: /dev/ptmx: %v", err)
	}
	for _, l := range [][2]string{{"/proc/self/fd", "/dev/fd"}, {"/proc/self/fd/0", "/dev/stdin"}, {"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"}} {
		_ = os.Symlink(l[0], l[1])
	}
	if err := EnableControllers(CgroupRoot, wantedControllers); err != nil {
		logf("boot: cgroup controllers: %v", err)
	}
	if err := LoopbackUp(); err != nil {
		logf("boot: loopback: %v", err)
	}
	if os.Getenv("PATH") == "" {
		os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return nil
}

func mountOnce(m mountPoint) error {
	if err := os.MkdirAll(m.target, m.mode); err != nil {
		return fmt.Errorf("mkdir %s: %w", m.target, err)
	}
	err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data)
	if err == nil || errors.Is(err, unix.EBUSY) {
		return nil
	}
	return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
}

// ensureStdio gives the agent a console on fds 0-2 when the kernel could not
// open one (an initramfs without /dev/console): log lines must go somewhere
// the host can read.
//
// The console itself may not exist yet: under Virtualization.framework it is
// hvc0, and Debian's cloud kernels build virtio_console as a module, so the
// kernel starts init with no fds 0-2 at all. Those are then held with
// /dev/null — otherwise the first files the agent opens (its channel above
// all) would become fds 0-2 and receive log lines — and LoadModulesAsync
// calls ensureStdio again once the modules are in.
func ensureStdio() {
	if _, err := unix.FcntlInt(2, unix.F_GETFD, 0); err == nil {
		if st, err := os.Readlink("/proc/self/fd/2"); err == nil && st != "/dev/null" {
			return
		}
	}
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		for i := 0; i < 3; i++ {
			if _, err := unix.FcntlInt(uintptr(i), unix.F_GETFD, 0); err == nil {
				continue // open already (/dev/null from an earlier call)
			}
			if nfd, err := unix.Open("/dev/null", unix.O_RDWR, 0); err == nil && nfd != i {
				_ = unix.Dup3(nfd, i, 0)
				unix.Close(nfd)
			}
		}
		return
	}
	for i := 0; i < 3; i++ {
		_ = unix.Dup3(fd, i, 0)
	}
	if fd > 2 {
		unix.Close(fd)
	}
}

// LoadModulesAsync loads the initramfs's modules in the background and
// closes the returned channel when it is done. The agent meanwhile opens its
// channel as soon as the port appears: load.list puts the channel's modules
// first, so the handshake with the host overlaps the loading of the rest
// (filesystems), which only container mounts wait for.
func LoadModulesAsync(logf Logf) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		start := time.Now()
		if err := LoadModules(filepath.Join(ModulesDir, "load.list"), logf); err != nil {
			logf("boot: modules: %v", err)
		}
		// A console that is a module (hvc0) exists only now.
		ensureStdio()
		logf("boot: modules loaded in %v", time.Since(start).Round(time.Millisecond))
	}()
	return done
}

// LoadModules loads each module named in list (one path per line, relative
// paths are under the list's directory) in order. A module that is already
// loaded or built in is fine.
func LoadModules(list string, logf Logf) error {
	f, err := os.Open(list)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a kernel with everything built in ships no list
	}
	if err != nil {
		return err
	}
	defer f.Close()
	var errs []error
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		path := line
		if !filepath.IsAbs(path) {
			path = filepath.Join(filepath.Dir(list), path)
		}
		if err := LoadModule(path); err != nil {
			errs = append(errs, err)
		}
	}
	if err := s.Err(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// LoadModule loads one module file with finit_module, asking the kernel to
// decompress it when it is compressed.
func LoadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("module %s: %w", path, err)
	}
	defer f.Close()
	flags := 0
	switch filepath.Ext(path) {
	case ".xz", ".zst", ".gz":
		flags |= unix.MODULE_INIT_COMPRESSED_FILE
	}
	err = unix.FinitModule(int(f.Fd()), "", flags)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("finit_module %s: %w", path, err)
	}
	return nil
}

// EnableControllers delegates the wanted controllers that the kernel offers
// to child cgroups of root. Each is written alone so one unavailable
// controller does not block the others.
func EnableControllers(root string, wanted []string) error {
	b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	if err != nil {
		return err
	}
	avail := map[string]bool{}
	for _, c := range strings.Fields(string(b)) {
		avail[c] = true
	}
	var errs []error
	for _, c := range wanted {
		if !avail[c] {
			continue
		}
		if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+"+c), 0); err != nil {
			errs = append(errs, fmt.Errorf("enable %s: %w", c, err))
		}
	}
	return errors.Join(errs...)
}

// LoopbackUp sets the IFF_UP flag of lo in the current network namespace.
func LoopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("get lo flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP | unix.IFF_RUNNING)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	return nil
}
