// Command testinit is a tiny PID 1 for the QEMU backend's boot tests (and
// the stand-in /init of `make boot` until the guest agent exists). It does
// what the real agent must do first: mount /proc, /sys and /dev, load the
// modules listed in /lib/modules/load.list, find the virtio-serial port
// named "agent" through /sys/class/virtio-ports (there is no udev), then
// talk to the host. The kernel command line picks its behaviour:
//
//	macvm.test=hello   (default) write "hello", a line describing the
//	                   disks and shares it sees, then echo lines until
//	                   "poweroff"
//	macvm.test=silent  never open the port (a guest that never answers)
//	macvm.test=exit    return from init, which panics the kernel
package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	mounts := []struct{ src, dst, typ string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	}
	for _, m := range mounts {
		if err := unix.Mount(m.src, m.dst, m.typ, 0, ""); err != nil && err != unix.EBUSY {
			logf("mount %s: %v", m.dst, err)
		}
	}
	logf("loading modules")
	loadModules()

	mode := "hello"
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if v, ok := strings.CutPrefix(f, "macvm.test="); ok {
				mode = v
			}
		}
	}
	logf("mode %s", mode)
	switch mode {
	case "silent":
		for {
			time.Sleep(time.Hour)
		}
	case "exit":
		return
	}

	port, err := findPort("agent", 20*time.Second)
	if err != nil {
		logf("%v", err)
		poweroff()
	}
	f, err := os.OpenFile(port, os.O_RDWR, 0)
	if err != nil {
		logf("open %s: %v", port, err)
		poweroff()
	}
	logf("port %s open", port)
	fmt.Fprintf(f, "hello\n")
	fmt.Fprintf(f, "%s\n", describe())
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "poweroff" {
			break
		}
		fmt.Fprintf(f, "%s\n", line)
	}
	poweroff()
}

func logf(format string, args ...any) {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	fmt.Fprintf(os.Stdout, "[%5d.%06d] testinit: "+format+"\n", append([]any{ts.Sec, ts.Nsec / 1000}, args...)...)
}

func loadModules() {
	list, err := os.ReadFile("/lib/modules/load.list")
	if err != nil {
		logf("no module list: %v", err)
		return
	}
	for _, p := range strings.Fields(string(list)) {
		f, err := os.Open(p)
		if err != nil {
			logf("open %s: %v", p, err)
			continue
		}
		if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
			logf("load %s: %v", p, err)
		}
		f.Close()
	}
}

// findPort polls sysfs because virtio-console creates ports asynchronously
// after the device probe and nothing in the guest announces them.
func findPort(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			if b, err := os.ReadFile(n); err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + filepath.Base(filepath.Dir(n))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %q after %s", name, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// describe reports what the host configured, so the test can check the
// backend's disk order, share tags and read-only shares:
// "disks vda:SECTORS:RO,... tags T1,T2 access T1=rw,T2=ro".
func describe() string {
	var disks []string
	blocks, _ := filepath.Glob("/sys/block/vd*")
	sort.Strings(blocks)
	for _, b := range blocks {
		size, _ := os.ReadFile(b + "/size")
		ro, _ := os.ReadFile(b + "/ro")
		disks = append(disks, fmt.Sprintf("%s:%s:%s", filepath.Base(b), strings.TrimSpace(string(size)), strings.TrimSpace(string(ro))))
	}
	var tags []string
	tagFiles, _ := filepath.Glob("/sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag")
	for _, t := range tagFiles {
		b, _ := os.ReadFile(t)
		tags = append(tags, strings.TrimRight(string(b), "\x00\n"))
	}
	sort.Strings(tags)
	// Mount each share and try to write to it: "tag=rw" when a file could
	// be created, "tag=ro" when the host refused.
	var access []string
	for _, tag := range tags {
		dir := "/run/" + tag
		_ = os.MkdirAll(dir, 0o755)
		if err := unix.Mount(tag, dir, "9p", 0, "trans=virtio,version=9p2000.L,msize=512000"); err != nil {
			access = append(access, tag+"=mount:"+err.Error())
			continue
		}
		err := os.WriteFile(dir+"/written-by-guest", []byte(tag), 0o644)
		switch {
		case err == nil:
			access = append(access, tag+"=rw")
		case errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
			access = append(access, tag+"=ro")
		default:
			access = append(access, tag+"=error:"+err.Error())
		}
		_ = unix.Unmount(dir, 0)
	}
	return fmt.Sprintf("disks %s tags %s access %s", strings.Join(disks, ","), strings.Join(tags, ","), strings.Join(access, ","))
}

func poweroff() {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		logf("poweroff: %v", err)
	}
	for {
		time.Sleep(time.Hour)
	}
}
