package container

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func cleanDest(p string) string { return filepath.Clean("/" + p) }

// securePath resolves unsafe (an absolute path as the container sees it)
// inside root, following symlinks as if root were "/", so a symlink in the
// image cannot make a mount land outside the container's root. Missing
// components are kept literally (they are about to be created).
func securePath(root, unsafe string) (string, error) {
	const maxLinks = 255
	resolved := "/"
	rest := strings.Split(cleanDest(unsafe), "/")
	links := 0
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, c)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				resolved = next
				continue
			}
			return "", err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			resolved = next
			continue
		}
		if links++; links > maxLinks {
			return "", fmt.Errorf("resolve %s: %w", unsafe, unix.ELOOP)
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", err
		}
		if filepath.IsAbs(target) {
			resolved = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return filepath.Join(root, resolved), nil
}

// mountInRoot performs one OCI spec mount under root.
func mountInRoot(root string, m specs.Mount) error {
	opts := parseMountOptions(m.Options)
	if m.Type == "bind" {
		opts.bind = true
	}
	dest, err := securePath(root, m.Destination)
	if err != nil {
		return fmt.Errorf("mount %s: %w", m.Destination, err)
	}
	if opts.bind {
		if err := bindMount(m.Source, dest, opts); err != nil {
			return fmt.Errorf("bind mount %s on %s: %w", m.Source, m.Destination, err)
		}
	} else {
		if err := os.MkdirAll(dest, 0o755); err != nil {
			return fmt.Errorf("mount %s: %w", m.Destination, err)
		}
		typ, data := m.Type, opts.data
		if typ == "cgroup" || typ == "cgroup2" {
			// cgroup v2 only: the guest has no v1 hierarchies.
			typ, data = "cgroup2", ""
		}
		if err := unix.Mount(m.Source, dest, typ, opts.flags, data); err != nil {
			return fmt.Errorf("mount %s (%s) on %s: %w", m.Source, typ, m.Destination, err)
		}
	}
	if opts.propagation != 0 {
		if err := unix.Mount("", dest, "", opts.propagation, ""); err != nil {
			return fmt.Errorf("propagation of %s: %w", m.Destination, err)
		}
	}
	return nil
}

func bindMount(src, dest string, opts mountOptions) error {
	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		err = os.MkdirAll(dest, 0o755)
	} else {
		err = createFile(dest)
	}
	if err != nil {
		return err
	}
	flags := uintptr(unix.MS_BIND)
	if opts.rec {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(src, dest, "", flags, ""); err != nil {
		return err
	}
	// A bind mount ignores every flag but MS_REC: apply ro/nosuid/... by a
	// remount of the new mount.
	if extra := opts.flags &^ (unix.MS_REMOUNT); extra != 0 {
		if err := unix.Mount("", dest, "", unix.MS_BIND|unix.MS_REMOUNT|extra|keptFlags(dest), ""); err != nil {
			return fmt.Errorf("remount: %w", err)
		}
	}
	return nil
}

func createFile(p string) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// keptFlags are the per-mount flags of the mount at p that a bind remount
// must repeat or the kernel clears them (statfs reports them with the same
// values as the MS_ flags).
func keptFlags(p string) uintptr {
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return 0
	}
	const keep = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_NODIRATIME | unix.MS_RELATIME
	return uintptr(st.Flags) & keep
}

type device struct {
	path         string
	typ          uint32
	major, minor int64
	mode         os.FileMode
}

// defaultDevices are the nodes every container gets in its /dev, as runc
// creates them.
var defaultDevices = []device{
	{"/dev/null", unix.S_IFCHR, 1, 3, 0o666},
	{"/dev/zero", unix.S_IFCHR, 1, 5, 0o666},
	{"/dev/full", unix.S_IFCHR, 1, 7, 0o666},
	{"/dev/random", unix.S_IFCHR, 1, 8, 0o666},
	{"/dev/urandom", unix.S_IFCHR, 1, 9, 0o666},
	{"/dev/tty", unix.S_IFCHR, 5, 0, 0o666},
}

// setupDev fills a fresh /dev with the default and the spec's devices and
// the usual symlinks (ptmx to the container's own devpts).
func setupDev(root string, spec *specs.Spec) error {
	devs := append([]device(nil), defaultDevices...)
	if spec.Linux != nil {
		for _, d := range spec.Linux.Devices {
			typ := uint32(unix.S_IFCHR)
			switch d.Type {
			case "b":
				typ = unix.S_IFBLK
			case "p":
				typ = unix.S_IFIFO
			}
			mode := os.FileMode(0o666)
			if d.FileMode != nil {
				mode = *d.FileMode & os.ModePerm
			}
			devs = append(devs, device{d.Path, typ, d.Major, d.Minor, mode})
		}
	}
	for _, d := range devs {
		dest, err := securePath(root, d.path)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
			return err
		}
		_ = os.Remove(dest)
		err = unix.Mknod(dest, d.typ|uint32(d.mode), int(unix.Mkdev(uint32(d.major), uint32(d.minor))))
		if err == nil {
			err = os.Chmod(dest, d.mode) // mknod honours the umask
		}
		if err != nil {
			// Without CAP_MKNOD (or on a nodev /dev) bind the guest's node.
			if berr := bindMount(d.path, dest, mountOptions{}); berr != nil {
				return fmt.Errorf("create device %s: %v; bind: %w", d.path, err, berr)
			}
		}
	}
	for _, l := range [][2]string{
		{"/proc/self/fd", "/dev/fd"},
		{"/proc/self/fd/0", "/dev/stdin"},
		{"/proc/self/fd/1", "/dev/stdout"},
		{"/proc/self/fd/2", "/dev/stderr"},
		{"pts/ptmx", "/dev/ptmx"},
	} {
		dest := filepath.Join(root, l[1])
		_ = os.Remove(dest)
		if err := os.Symlink(l[0], dest); err != nil {
			return fmt.Errorf("symlink %s: %w", l[1], err)
		}
	}
	return nil
}

// enterRoot makes root the process's "/". pivot_root is refused while the
// current root is the initramfs (rootfs), which is the agent's case, so the
// fallback moves the container's root mount over "/" and chroots, having
// first detached every mount the container must not reach.
func enterRoot(root string) error {
	oldroot, err := unix.Open("/", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(oldroot)
	newroot, err := unix.Open(root, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(newroot)
	if err := unix.Fchdir(newroot); err != nil {
		return err
	}
	err = unix.PivotRoot(".", ".")
	if err == nil {
		// The old root is now stacked under the new one at ".": detach it.
		if err := unix.Fchdir(oldroot); err != nil {
			return err
		}
		if err := unix.Mount("", ".", "", unix.MS_SLAVE|unix.MS_REC, ""); err != nil {
			return err
		}
		if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
			return fmt.Errorf("detach old root: %w", err)
		}
		return unix.Chdir("/")
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("pivot_root: %w", err)
	}
	return moveRoot(root)
}

func moveRoot(root string) error {
	for _, t := range mountsOutside(root, readMountTargets()) {
		_ = unix.Unmount(t, unix.MNT_DETACH)
	}
	if err := unix.Chdir(root); err != nil {
		return err
	}
	if err := unix.Mount(root, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

// mountsOutside lists, deepest first, the mounts that are neither root, nor
// under it, nor an ancestor of it (detaching an ancestor would take root
// along).
func mountsOutside(root string, targets []string) []string {
	var out []string
	for _, t := range targets {
		if t == "/" || t == root || strings.HasPrefix(t, root+"/") || strings.HasPrefix(root, t+"/") {
			continue
		}
		out = append(out, t)
	}
	sort.SliceStable(out, func(i, j int) bool { return strings.Count(out[i], "/") > strings.Count(out[j], "/") })
	return out
}

func readMountTargets() []string {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) >= 2 {
			out = append(out, strings.ReplaceAll(fields[1], `\040`, " "))
		}
	}
	return out
}

func remountReadonly(p string) error {
	return unix.Mount("", p, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|keptFlags(p), "")
}

// readonlyPath makes p (inside the new root) read-only; absent paths are fine.
func readonlyPath(p string) error {
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("readonly path %s: %w", p, err)
	}
	if err := remountReadonly(p); err != nil {
		return fmt.Errorf("readonly path %s: %w", p, err)
	}
	return nil
}

// maskPath hides p: an empty read-only tmpfs over a directory, /dev/null
// over a file.
func maskPath(p string) error {
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("masked path %s: %w", p, err)
	}
	if fi.IsDir() {
		err = unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY, "")
	} else {
		err = unix.Mount("/dev/null", p, "", unix.MS_BIND, "")
	}
	if err != nil {
		return fmt.Errorf("masked path %s: %w", p, err)
	}
	return nil
}
