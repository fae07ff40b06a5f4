package boot

import (
	"bufio"
	"os"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// PowerOff syncs, unmounts what can be unmounted and powers the VM off.
// QEMU (run with -no-reboot) exits on either a power-off or a reboot, so a
// reboot is the fallback if the machine model ignores the power-off. It only
// returns if both fail.
func PowerOff() error {
	unix.Sync()
	UnmountAll()
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	if err2 := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err2 != nil {
		return err
	}
	return nil
}

// UnmountAll lazily unmounts every mount except the pseudo filesystems the
// kernel needs until the end, deepest first, so shares are flushed before
// the power goes.
func UnmountAll() {
	for _, target := range unmountOrder(readMountTargets()) {
		_ = unix.Unmount(target, unix.MNT_DETACH)
	}
}

func readMountTargets() []string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil
	}
	defer f.Close()
	var targets []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) >= 2 {
			targets = append(targets, unescapeMount(fields[1]))
		}
	}
	return targets
}

// keep are mounts left in place: the root and the filesystems the power-off
// path itself may touch.
var keep = map[string]bool{"/": true, "/proc": true, "/sys": true, "/dev": true}

// unmountOrder sorts targets deepest first and drops the ones to keep.
func unmountOrder(targets []string) []string {
	var out []string
	for _, t := range targets {
		if !keep[t] {
			out = append(out, t)
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		return strings.Count(out[i], "/") > strings.Count(out[j], "/")
	})
	return out
}

// unescapeMount undoes the octal escapes (\040 for a space, ...) that
// /proc/self/mounts uses in paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, ok := octal(s[i+1 : i+4]); ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func octal(s string) (byte, bool) {
	if len(s) != 3 {
		return 0, false
	}
	var v int
	for _, c := range s {
		if c < '0' || c > '7' {
			return 0, false
		}
		v = v*8 + int(c-'0')
	}
	return byte(v), v < 256
}
