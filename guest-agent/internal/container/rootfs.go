package container

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
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

// mountInRoot performs one OCI spec mount under the container's root,
// open as rootFD (root is its path). The mount point is resolved once, by
// openInRoot, and the mount goes onto that open file: resolving a path in
// the pod share costs a 9p round trip per component under emulation (the
// share is mounted cache=mmap, which keeps no unused dentries), and a
// path-based securePath, MkdirAll and mount resolved each mount point
// three times.
func mountInRoot(rootFD int, root string, m specs.Mount) error {
	opts := parseMountOptions(m.Options)
	if m.Type == "bind" {
		opts.bind = true
	}
	fd, err := mountPoint(rootFD, root, m, opts.bind)
	if err != nil {
		if opts.bind {
			return fmt.Errorf("bind mount %s on %s: %w", m.Source, m.Destination, err)
		}
		return fmt.Errorf("mount %s: %w", m.Destination, err)
	}
	defer unix.Close(fd)
	if opts.bind {
		flags := uintptr(unix.MS_BIND)
		if opts.rec {
			flags |= unix.MS_REC
		}
		if err := unix.Mount(m.Source, fdPath(fd), "", flags, ""); err != nil {
			return fmt.Errorf("bind mount %s on %s: %w", m.Source, m.Destination, err)
		}
	} else {
		typ, data := m.Type, opts.data
		if typ == "cgroup" || typ == "cgroup2" {
			// cgroup v2 only: the guest has no v1 hierarchies.
			typ, data = "cgroup2", ""
		}
		if err := unix.Mount(m.Source, fdPath(fd), typ, opts.flags, data); err != nil {
			return fmt.Errorf("mount %s (%s) on %s: %w", m.Source, typ, m.Destination, err)
		}
	}
	remount := opts.bind && opts.flags&^unix.MS_REMOUNT != 0
	if !remount && opts.propagation == 0 {
		return nil
	}
	// fd is the directory the new mount covers: a remount or a change of
	// propagation must name the mount itself, which a fresh walk (through
	// dentries the mounts now pin, so no round trips) reaches.
	top, err := openInRoot(rootFD, m.Destination)
	if err != nil {
		return fmt.Errorf("mount %s: %w", m.Destination, err)
	}
	defer unix.Close(top)
	if remount {
		// A bind mount ignores every flag but MS_REC: apply ro/nosuid/...
		// by a remount of the new mount.
		flags := unix.MS_BIND | unix.MS_REMOUNT | opts.flags&^unix.MS_REMOUNT | keptFlagsFd(top)
		if err := unix.Mount("", fdPath(top), "", flags, ""); err != nil {
			return fmt.Errorf("bind mount %s on %s: remount: %w", m.Source, m.Destination, err)
		}
	}
	if opts.propagation != 0 {
		if err := unix.Mount("", fdPath(top), "", opts.propagation, ""); err != nil {
			return fmt.Errorf("propagation of %s: %w", m.Destination, err)
		}
	}
	return nil
}

// mountPoint opens m's destination inside the container's root (see
// openInRoot), creating it when missing: a directory, or for a bind mount
// of a file an empty file.
func mountPoint(rootFD int, root string, m specs.Mount, bind bool) (int, error) {
	fd, err := openInRoot(rootFD, m.Destination)
	if !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	dir := true
	if bind {
		fi, err := os.Stat(m.Source)
		if err != nil {
			return -1, err
		}
		dir = fi.IsDir()
	}
	if fd, err := createInParent(rootFD, m.Destination, dir); err == nil || !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EEXIST) {
		return fd, err
	}
	// More than the last component is missing, or the last one is a
	// dangling symlink: securePath follows the image's symlinks inside
	// root as openat2's RESOLVE_IN_ROOT does, so what it creates is what
	// openInRoot then finds.
	dest, err := securePath(root, m.Destination)
	if err != nil {
		return -1, err
	}
	if dir {
		err = os.MkdirAll(dest, 0o755)
	} else {
		err = createFile(dest)
	}
	if err != nil {
		return -1, err
	}
	return openInRoot(rootFD, m.Destination)
}

// createInParent creates p's last component (a directory when dir, else an
// empty file) in its parent, resolved inside the root, and opens it: the
// common case of a missing mount point (an image without /run), in the
// fewest 9p round trips. ENOENT: the parent is missing too; EEXIST: the
// name is there, as a dangling symlink or made meanwhile.
func createInParent(rootFD int, p string, dir bool) (int, error) {
	parent, base := filepath.Split(cleanDest(p))
	if base == "" {
		return -1, unix.EEXIST // "/" exists
	}
	pfd := rootFD
	if parent != "/" {
		var err error
		if pfd, err = openInRoot(rootFD, parent); err != nil {
			return -1, err
		}
		defer unix.Close(pfd)
	}
	if dir {
		if err := unix.Mkdirat(pfd, base, 0o755); err != nil {
			return -1, err
		}
	} else {
		fd, err := unix.Openat(pfd, base, unix.O_CREAT|unix.O_EXCL|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
		if err != nil {
			return -1, err
		}
		unix.Close(fd)
	}
	fd, err := unix.Openat2(pfd, base, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS,
	})
	if err != nil {
		return -1, &os.PathError{Op: "open created mount point", Path: p, Err: err}
	}
	return fd, nil
}

// openInRoot opens p (a path as the container sees it) as an O_PATH file
// below rootFD, resolving it as if rootFD were "/": the kernel keeps
// symlinks and ".." of the image inside the root (openat2 with
// RESOLVE_IN_ROOT), and the file, unlike a path, cannot be swapped for a
// symlink between the check and the mount.
func openInRoot(rootFD int, p string) (int, error) {
	rel := strings.TrimPrefix(cleanDest(p), "/")
	if rel == "" {
		rel = "."
	}
	how := &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	for tries := 0; ; tries++ {
		fd, err := unix.Openat2(rootFD, rel, how)
		// EAGAIN: a rename raced with a ".." in the walk; the kernel asks
		// for a retry.
		if (err == unix.EAGAIN && tries < 16) || err == unix.EINTR {
			continue
		}
		if err != nil {
			return -1, &os.PathError{Op: "resolve in container root", Path: p, Err: err}
		}
		return fd, nil
	}
}

// fdPath names an open file for a syscall that takes paths (mount): the
// kernel follows the magic link to the file itself, not to a path.
func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

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

// keptFlagsFd is keptFlags of the mount fd is open on.
func keptFlagsFd(fd int) uintptr {
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return 0
	}
	return uintptr(st.Flags) & keptMountFlags
}

// keptMountFlags are the per-mount flags a bind remount must repeat.
const keptMountFlags = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_NODIRATIME | unix.MS_RELATIME

// keptFlags are the per-mount flags of the mount at p that a bind remount
// must repeat or the kernel clears them (statfs reports them with the same
// values as the MS_ flags).
func keptFlags(p string) uintptr {
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return 0
	}
	return uintptr(st.Flags) & keptMountFlags
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
