// Package container runs OCI containers inside the guest: it mounts each
// container's root filesystem, creates its cgroup v2, starts its processes
// through a re-executed helper in fresh (or joined) namespaces, wires their
// stdio to host streams and tracks their lives until deletion.
package container

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/reaper"
	"github.com/macvm/macvm/guest-agent/internal/seccomp"
)

// Streams hands out the stdio streams the host opened, by name, waiting for
// one that has not arrived yet until ctx ends.
type Streams interface {
	Wait(ctx context.Context, name string) (net.Conn, error)
}

// Mount is one mount of a container's root filesystem; Target is relative
// to the root ("" is the root itself).
type Mount struct {
	Type, Source, Target string
	Options              []string
}

// Config locates the agent's state; the zero value is not usable, see
// DefaultConfig.
type Config struct {
	// RunDir holds one directory per container (its rootfs mount point).
	RunDir string
	// CgroupRoot is the cgroup2 mount; CgroupParent the group under it
	// that holds one child per container.
	CgroupRoot   string
	CgroupParent string
	// MountsReady, if set, is closed once the kernel can mount what
	// containers use (the filesystem modules are loaded); Create waits.
	MountsReady <-chan struct{}
	// FavorDynmods remounts CgroupRoot with cgroup2's favordynmods in
	// PrepareCgroups (set in the guest only: the host tests must not
	// remount the build machine's hierarchy); see favorDynmods.
	FavorDynmods bool
	// Trace, if set, gets how long each step of a container's create took
	// (the agent sets it with macvm.debug=1): under emulation a create is
	// most of a warm start, and the host sees only its total.
	Trace func(format string, args ...any)
}

// DefaultConfig is where the agent keeps containers in the guest.
func DefaultConfig() Config {
	return Config{RunDir: "/run/macvm/c", CgroupRoot: "/sys/fs/cgroup", CgroupParent: "macvm", FavorDynmods: true}
}

// Manager owns every container of the guest.
type Manager struct {
	cfg     Config
	reaper  *reaper.Reaper
	streams Streams
	// onOOM is told when a container's cgroup records an OOM kill.
	onOOM func(containerID string)

	// mu guards containers, spare and spareStarting.
	mu         sync.Mutex
	containers map[string]*Container
	// spare is the helper started ahead for the next container whose
	// namespaces it matches (spare.go); nil once taken.
	spare         *spareHelper
	spareStarting bool

	// cgroupsReady is set once PrepareCgroups made the containers'
	// parent cgroup.
	cgroupsReady atomic.Bool

	// sharesMu guards shares.
	sharesMu sync.Mutex
	// shares counts the users of each mounted share tag: a virtio-9p
	// device serves a single mount at a time, so each tag is mounted once
	// under RunDir/../shares and bind-mounted into every container using it.
	shares map[string]int
	// prepareMu serialises PrepareShares and guards pinned: the shares it
	// mounted, each holding one reference for the VM's life.
	prepareMu sync.Mutex
	pinned    map[string]bool
}

// NewManager returns a Manager; onOOM may be nil.
func NewManager(cfg Config, r *reaper.Reaper, streams Streams, onOOM func(string)) *Manager {
	if onOOM == nil {
		onOOM = func(string) {}
	}
	return &Manager{cfg: cfg, reaper: r, streams: streams, onOOM: onOOM, containers: map[string]*Container{}, shares: map[string]int{}, pinned: map[string]bool{}}
}

// Container is one container: its root, cgroup, init and exec processes.
type Container struct {
	ID     string
	m      *Manager
	dir    string
	rootfs string
	// mounted are the rootfs mount targets in mount order; shares the
	// share tags it holds a reference on.
	mounted []string
	shares  []string
	// disks are the mounted disks of a block-image root filesystem, in
	// mount order, and diskDirs the mount points made for them.
	disks    []string
	diskDirs []string
	cg       *cgroup2.Manager
	cgPath   string
	cgFD     int
	init     *Process
	stopOOM  func()
	// shmDir is the tmpfs behind the container's /dev/shm when it has a
	// new IPC namespace, in the agent's mounts so that containers joining
	// that namespace get the same /dev/shm.
	shmDir string
	// seccomp is the compiled linux.seccomp (nil: none), set at create.
	seccomp *seccomp.Program

	// mu guards execs and deleted.
	mu      sync.Mutex
	execs   map[string]*Process
	deleted bool

	// deleteMu serialises Deletes (teardown must run once); gone, which it
	// guards, records that one completed.
	deleteMu sync.Mutex
	gone     bool
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Get returns the container with id.
func (m *Manager) Get(id string) (*Container, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.containers[id]
	if !ok || c == nil {
		return nil, fmt.Errorf("container %q: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

// List returns every container, in no particular order.
func (m *Manager) List() []*Container {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*Container
	for _, c := range m.containers {
		if c != nil {
			out = append(out, c)
		}
	}
	return out
}

// Create mounts the root filesystem (the disks in devices first, then the
// rootfs mounts), creates the cgroup and starts the init helper, which
// stops before execve until StartProcess. noSpare starts the helper afresh
// even when the spare helper would do, leaving the spare to the next
// container.
func (m *Manager) Create(ctx context.Context, id string, specJSON []byte, devices []BlockDevice, rootfs []Mount, stdio Stdio, noSpare bool) (_ *Container, retErr error) {
	if !validID.MatchString(id) {
		return nil, fmt.Errorf("container id %q: %w", id, errdefs.ErrInvalidArgument)
	}
	spec, err := parseSpec(specJSON)
	if err != nil {
		return nil, err
	}
	cloneflags, join, newCgroup, newNet, err := initNamespaces(spec)
	if err != nil {
		return nil, err
	}
	filter, err := compileSeccomp(spec)
	if err != nil {
		return nil, err
	}
	// Reserve the id so a concurrent Create of the same id fails fast.
	m.mu.Lock()
	if _, ok := m.containers[id]; ok {
		m.mu.Unlock()
		return nil, fmt.Errorf("container %q: %w", id, errdefs.ErrAlreadyExists)
	}
	m.containers[id] = nil
	m.mu.Unlock()

	c := &Container{ID: id, m: m, dir: filepath.Join(m.cfg.RunDir, id), cgFD: -1, execs: map[string]*Process{}, seccomp: filter}
	c.rootfs = filepath.Join(c.dir, "rootfs")
	defer func() {
		if retErr != nil {
			c.teardown()
			m.mu.Lock()
			delete(m.containers, id)
			m.mu.Unlock()
		}
	}()
	done := m.step(id, "wait for modules")
	if err := m.waitMounts(ctx); err != nil {
		return nil, err
	}
	done()
	if err := c.mountDevices(ctx, devices); err != nil {
		return nil, err
	}
	done = m.step(id, "rootfs")
	if err := c.mountRootfs(rootfs); err != nil {
		return nil, err
	}
	done()
	done = m.step(id, "shares")
	if err := c.prepareShares(spec); err != nil {
		return nil, err
	}
	done()
	if err := c.prepareShm(spec, cloneflags, join); err != nil {
		return nil, err
	}
	done = m.step(id, "cgroup")
	if err := c.createCgroup(spec); err != nil {
		return nil, err
	}
	done()
	withTerminal(spec.Process, &stdio)
	done = m.step(id, "take spare")
	var spare *spareHelper
	if !noSpare {
		spare = m.takeSpare(ctx, cloneflags, join)
	}
	done()
	done = m.step(id, "helper ready")
	if spare != nil && spec.Hostname == "" {
		// A fresh UTS namespace starts with the VM's hostname as it is
		// now; the spare's was copied when it started.
		if h, err := os.Hostname(); err == nil {
			spec.Hostname = h
		}
	}
	var trace func(string, ...any)
	if m.cfg.Trace != nil {
		trace = func(format string, args ...any) {
			m.cfg.Trace("trace: container %s: "+format, append([]any{id}, args...)...)
		}
	}
	c.init, err = spawn(ctx, m.reaper, m.streams, spawnSpec{
		cfg:        &helperConfig{Init: true, Rootfs: c.rootfs, Spec: spec, Process: spec.Process, NewCgroupNS: newCgroup, NewNetNS: newNet, Trace: trace != nil, Seccomp: filter},
		trace:      trace,
		stdio:      stdio,
		cloneflags: cloneflags,
		join:       join,
		cgroupFD:   c.cgFD,
		spare:      spare,
		onExit:     c.initExited,
	})
	if err != nil {
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	done()
	c.stopOOM = watchOOM(c.cgPath, func() { m.onOOM(id) })
	m.mu.Lock()
	m.containers[id] = c
	m.mu.Unlock()
	return c, nil
}

// waitMounts waits until the kernel can mount what containers use (the
// filesystem modules are loaded), or ctx ends.
func (m *Manager) waitMounts(ctx context.Context) error {
	if m.cfg.MountsReady == nil {
		return nil
	}
	select {
	case <-m.cfg.MountsReady:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the guest's filesystem modules: %w", ctx.Err())
	}
}

// PrepareShares mounts the shares of tags (9p, else virtiofs) ahead of the
// containers that will use them and keeps them mounted for the VM's life:
// a VM of the warm-start pool waits with its pod share mounted, so the
// first container's create skips the mount. A share already prepared is
// left alone.
func (m *Manager) PrepareShares(ctx context.Context, tags []string) error {
	if err := m.waitMounts(ctx); err != nil {
		return err
	}
	m.prepareMu.Lock()
	defer m.prepareMu.Unlock()
	for _, tag := range tags {
		if m.pinned[tag] {
			continue
		}
		if _, err := m.acquireShare(Mount{Type: "9p", Source: tag, Options: defaultShareOptions}); err != nil {
			if _, verr := m.acquireShare(Mount{Type: "virtiofs", Source: tag}); verr != nil {
				return fmt.Errorf("prepare share %q: %w", tag, err)
			}
		}
		m.pinned[tag] = true
	}
	return nil
}

// step starts timing one step of container id's create for Config.Trace
// and returns the function that ends and reports it.
func (m *Manager) step(id, name string) func() {
	if m.cfg.Trace == nil {
		return func() {}
	}
	start := time.Now()
	return func() {
		m.cfg.Trace("trace: container %s: %s %.1fms", id, name, float64(time.Since(start).Microseconds())/1000)
	}
}

// mountRootfs mounts the rootfs mounts in order under the container's dir.
func (c *Container) mountRootfs(mounts []Mount) error {
	if err := os.MkdirAll(c.rootfs, 0o755); err != nil {
		return fmt.Errorf("rootfs dir: %w", err)
	}
	for _, mt := range mounts {
		target, err := securePath(c.rootfs, mt.Target)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("rootfs mount point %s: %w", mt.Target, err)
		}
		opts := parseMountOptions(mt.Options)
		if mt.Type == "9p" || mt.Type == "virtiofs" {
			src, err := c.m.acquireShare(mt)
			if err != nil {
				return err
			}
			c.shares = append(c.shares, mt.Source)
			if err := bindMount(src, target, mountOptions{flags: opts.flags, rec: true}); err != nil {
				return fmt.Errorf("rootfs bind of share %s: %w", mt.Source, err)
			}
		} else if mt.Type == "bind" || opts.bind {
			if err := c.acquirePodShare(mt.Source); err != nil {
				return err
			}
			if err := bindMount(mt.Source, target, opts); err != nil {
				return fmt.Errorf("rootfs bind %s: %w", mt.Source, err)
			}
		} else if err := unix.Mount(mt.Source, target, mt.Type, opts.flags, opts.data); err != nil {
			return fmt.Errorf("mount rootfs %s (%s) on %s: %w", mt.Source, mt.Type, target, err)
		}
		c.mounted = append(c.mounted, target)
	}
	return nil
}

// ShareRoot is where the agent mounts shares: tag T at ShareRoot/T. The host
// may name bind sources below it (a single file of a shared directory).
func (m *Manager) ShareRoot() string { return filepath.Join(filepath.Dir(m.cfg.RunDir), "shares") }

// defaultShareOptions mount a share that a spec only names through a bind
// source below ShareRoot.
var defaultShareOptions = []string{"trans=virtio", "version=9p2000.L", "msize=512000", "cache=mmap"}

// prepareShares makes the spec's shares usable by the helper, which runs in
// a copy of the agent's mounts: a 9p/virtiofs mount becomes a bind of the
// share mounted once under ShareRoot (the device admits one mount), and a
// bind whose source lies below ShareRoot gets that share mounted first.
func (c *Container) prepareShares(spec *specs.Spec) error {
	root := c.m.ShareRoot() + "/"
	for i := range spec.Mounts {
		mt := &spec.Mounts[i]
		switch {
		case mt.Type == "9p" || mt.Type == "virtiofs":
			p, err := c.m.acquireShare(Mount{Type: mt.Type, Source: mt.Source, Options: mt.Options})
			if err != nil {
				return fmt.Errorf("mount %s: %w", mt.Destination, err)
			}
			c.shares = append(c.shares, mt.Source)
			flags := []string{"rbind"}
			for _, o := range mt.Options {
				if _, ok := flagOptions[o]; ok {
					flags = append(flags, o)
				}
			}
			*mt = specs.Mount{Destination: mt.Destination, Type: "bind", Source: p, Options: flags}
		case mt.Type == "bind" || hasOption(mt.Options, "bind", "rbind"):
			if err := c.acquirePodShare(mt.Source); err != nil {
				return fmt.Errorf("mount %s: %w", mt.Destination, err)
			}
			if !strings.HasPrefix(mt.Source, root) {
				continue
			}
			tag, _, _ := strings.Cut(strings.TrimPrefix(mt.Source, root), "/")
			if _, err := c.m.acquireShare(Mount{Type: "9p", Source: tag, Options: defaultShareOptions}); err != nil {
				var verr error
				if _, verr = c.m.acquireShare(Mount{Type: "virtiofs", Source: tag}); verr != nil {
					return fmt.Errorf("mount %s: %w", mt.Destination, err)
				}
			}
			c.shares = append(c.shares, tag)
		}
	}
	return nil
}

// PodShareTag is the pod VM's one share (the shim's layout): every
// container's rootfs and bind sources are below it, at
// PodShareDir/<container-id>/.
const PodShareTag = "shared"

// PodShareDir is where the agent mounts the pod share.
func (m *Manager) PodShareDir() string { return filepath.Join(filepath.Dir(m.cfg.RunDir), "shared") }

// prepareShm makes /dev/shm follow the IPC namespace, as runc does for a
// pod with its sandbox's shm: a container with a new IPC namespace gets
// its /dev/shm tmpfs mounted in the agent's mounts (shmDir) and bound in,
// and a container that joins the IPC namespace of another container's init
// (/proc/<pid>/ns/ipc) gets that container's shmDir instead of its own.
func (c *Container) prepareShm(spec *specs.Spec, cloneflags uintptr, join []nsJoin) error {
	i := slices.IndexFunc(spec.Mounts, func(m specs.Mount) bool { return cleanDest(m.Destination) == "/dev/shm" })
	if i < 0 || spec.Mounts[i].Type != "tmpfs" {
		return nil
	}
	mt := spec.Mounts[i]
	opts := parseMountOptions(mt.Options)
	bindFlags := []string{"rbind"}
	for _, o := range mt.Options {
		if o == "nosuid" || o == "nodev" || o == "noexec" || o == "ro" {
			bindFlags = append(bindFlags, o)
		}
	}
	for _, j := range join {
		if j.Type != specs.IPCNamespace {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(j.Path, "/proc/%d/ns/ipc", &pid); err != nil {
			return nil
		}
		for _, o := range c.m.List() {
			if o != c && o.shmDir != "" && o.init != nil && o.init.Pid() == pid {
				spec.Mounts[i] = specs.Mount{Destination: mt.Destination, Type: "bind", Source: o.shmDir, Options: bindFlags}
				return nil
			}
		}
		return nil
	}
	if cloneflags&unix.CLONE_NEWIPC == 0 {
		return nil
	}
	dir := filepath.Join(c.dir, "shm")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("/dev/shm: %w", err)
	}
	if err := unix.Mount(mt.Source, dir, "tmpfs", opts.flags, opts.data); err != nil {
		return fmt.Errorf("mount /dev/shm tmpfs: %w", err)
	}
	c.shmDir = dir
	c.mounted = append(c.mounted, dir)
	spec.Mounts[i] = specs.Mount{Destination: mt.Destination, Type: "bind", Source: dir, Options: bindFlags}
	return nil
}

func (m *Manager) sharePath(tag string) string {
	if tag == PodShareTag {
		return m.PodShareDir()
	}
	return filepath.Join(m.ShareRoot(), tag)
}

// acquirePodShare mounts the pod share (once per VM, counted per
// container) when src, a bind source, lies below it.
func (c *Container) acquirePodShare(src string) error {
	if !strings.HasPrefix(filepath.Clean(src), c.m.PodShareDir()+"/") {
		return nil
	}
	if slices.Contains(c.shares, PodShareTag) {
		return nil
	}
	if _, err := c.m.acquireShare(Mount{Type: "9p", Source: PodShareTag, Options: defaultShareOptions}); err != nil {
		if _, verr := c.m.acquireShare(Mount{Type: "virtiofs", Source: PodShareTag}); verr != nil {
			return fmt.Errorf("mount the pod share: %w", err)
		}
	}
	c.shares = append(c.shares, PodShareTag)
	return nil
}

// acquireShare mounts a 9p/virtiofs share on first use and returns where.
func (m *Manager) acquireShare(mt Mount) (string, error) {
	if !validID.MatchString(mt.Source) {
		return "", fmt.Errorf("share tag %q: %w", mt.Source, errdefs.ErrInvalidArgument)
	}
	m.sharesMu.Lock()
	defer m.sharesMu.Unlock()
	p := m.sharePath(mt.Source)
	if m.shares[mt.Source] == 0 {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return "", err
		}
		// Mount flags such as ro belong to each container's bind, not to
		// the shared mount.
		opts := parseMountOptions(mt.Options)
		if err := unix.Mount(mt.Source, p, mt.Type, opts.flags&^unix.MS_RDONLY, opts.data); err != nil {
			return "", fmt.Errorf("mount share %s (%s): %w", mt.Source, mt.Type, err)
		}
	}
	m.shares[mt.Source]++
	return p, nil
}

// releaseShare drops a reference and unmounts the share with the last one.
func (m *Manager) releaseShare(tag string) {
	m.sharesMu.Lock()
	defer m.sharesMu.Unlock()
	if m.shares[tag]--; m.shares[tag] > 0 {
		return
	}
	delete(m.shares, tag)
	p := m.sharePath(tag)
	unix.Unmount(p, unix.MNT_DETACH)
	os.Remove(p)
}

// delegatedControllers are the controllers of avail (the root's) that
// containers' cgroups get: stats need them even without limits.
func delegatedControllers(avail []string) []string {
	var want []string
	for _, ctl := range avail {
		switch ctl {
		case "cpu", "cpuset", "io", "memory", "pids", "hugetlb":
			want = append(want, ctl)
		}
	}
	return want
}

// PrepareCgroups creates the parent of the containers' cgroups
// (/sys/fs/cgroup/macvm) with their controllers enabled, once per VM: the
// agent does it at boot, so a warm-start template holds it and the first
// container's create only makes its own group (under emulation each cgroup
// file write is slow). Until it succeeds, each create does it itself.
func (m *Manager) PrepareCgroups() error {
	if m.cfg.FavorDynmods {
		if err := favorDynmods(m.cfg.CgroupRoot); err != nil {
			return err
		}
	}
	group := "/" + m.cfg.CgroupParent
	parent, err := cgroup2.NewManager(m.cfg.CgroupRoot, group, &cgroup2.Resources{})
	if err != nil {
		return fmt.Errorf("create cgroup %s: %w", group, err)
	}
	avail, err := parent.RootControllers()
	if err != nil {
		return fmt.Errorf("cgroup controllers: %w", err)
	}
	want := delegatedControllers(avail)
	// The ancestors' subtree_control (the root's), then the parent's own.
	if err := parent.ToggleControllers(want, cgroup2.Enable); err != nil {
		return fmt.Errorf("enable controllers %v: %w", want, err)
	}
	if len(want) > 0 {
		ctl := "+" + strings.Join(want, " +")
		if err := os.WriteFile(filepath.Join(m.cfg.CgroupRoot, group, "cgroup.subtree_control"), []byte(ctl), 0); err != nil {
			return fmt.Errorf("enable controllers %v in %s: %w", want, group, err)
		}
	}
	m.cgroupsReady.Store(true)
	return nil
}

// favorDynmods remounts the cgroup2 hierarchy at root with favordynmods
// (Linux 6.0+), keeping nsdelegate. Every container's create moves a
// process between cgroups (the spare helper into the container's, an
// exec's helper into it too), and a move takes the cgroup threadgroup
// rwsem for writing: by default a per-CPU rwsem whose writer waits for an
// RCU grace period, which costs milliseconds on an emulated (TCG) guest.
// favordynmods makes it a plain rwsem: moves no longer wait, forks and
// exits take a slightly dearer read lock. A kernel without the option
// refuses it (EINVAL): the mount stays as it was.
func favorDynmods(root string) error {
	const flags = unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	err := unix.Mount("", root, "", flags, "nsdelegate,favordynmods")
	if errors.Is(err, unix.EINVAL) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remount %s with favordynmods: %w", root, err)
	}
	return nil
}

// createCgroup makes /sys/fs/cgroup/macvm/<id> with every controller the
// guest offers enabled (stats need them even without limits), then applies
// the spec's resources.
func (c *Container) createCgroup(spec *specs.Spec) error {
	group := "/" + c.m.cfg.CgroupParent + "/" + c.ID
	c.cgPath = filepath.Join(c.m.cfg.CgroupRoot, group)
	if c.m.cgroupsReady.Load() {
		// The parent delegates the controllers already (PrepareCgroups):
		// the group gets them when it is made.
		if err := os.Mkdir(c.cgPath, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create cgroup %s: %w", group, err)
		}
		cg, err := cgroup2.Load(group, cgroup2.WithMountpoint(c.m.cfg.CgroupRoot))
		if err != nil {
			os.Remove(c.cgPath)
			return fmt.Errorf("cgroup %s: %w", group, err)
		}
		c.cg = cg
	} else {
		cg, err := cgroup2.NewManager(c.m.cfg.CgroupRoot, group, &cgroup2.Resources{})
		if err != nil {
			return fmt.Errorf("create cgroup %s: %w", group, err)
		}
		c.cg = cg
		if avail, err := cg.RootControllers(); err == nil {
			want := delegatedControllers(avail)
			if err := cg.ToggleControllers(want, cgroup2.Enable); err != nil {
				return fmt.Errorf("enable controllers %v: %w", want, err)
			}
		}
	}
	if spec.Linux != nil && spec.Linux.Resources != nil {
		if err := c.update(spec.Linux.Resources); err != nil {
			return err
		}
	}
	fd, err := unix.Open(c.cgPath, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open cgroup: %w", err)
	}
	c.cgFD = fd
	return nil
}

// update applies OCI resources, leaving out what this guest kernel cannot
// enforce (swap accounting, BFQ weights, device rules: the VM itself is the
// device boundary).
func (c *Container) update(r *specs.LinuxResources) error {
	res := cgroup2.ToResources(r)
	res.Devices = nil
	exists := func(f string) bool {
		_, err := os.Stat(filepath.Join(c.cgPath, f))
		return err == nil
	}
	if res.Memory != nil && res.Memory.Swap != nil && !exists("memory.swap.max") {
		res.Memory.Swap = nil
	}
	if res.IO != nil && res.IO.BFQ.Weight != 0 && !exists("io.bfq.weight") {
		res.IO.BFQ.Weight = 0
	}
	if res.HugeTlb != nil && !exists("hugetlb.2MB.max") {
		res.HugeTlb = nil
	}
	if res.RDMA != nil && !exists("rdma.max") {
		res.RDMA = nil
	}
	if err := c.cg.Update(res); err != nil {
		return fmt.Errorf("update cgroup resources: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Init returns the container's init process.
func (c *Container) Init() *Process { return c.init }

// Process returns the init ("" id) or an exec process.
func (c *Container) Process(execID string) (*Process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %q in container %q: %w", execID, c.ID, errdefs.ErrNotFound)
	}
	return p, nil
}

// withTerminal makes the process spec and the stdio agree on whether the
// process has a terminal: either one asking for it is enough. The helper
// allocates the pty from the spec while the agent expects its master (and
// wires no pipes) from the stdio, so a disagreement either way breaks the
// process. containerd's client sets it only on the request (cio.WithTerminal)
// and leaves the exec spec, usually copied from a non-tty container, at
// false; an OCI spec that asks for a terminal gets one whatever the host's
// stdio says, as runc would allocate it.
func withTerminal(p *specs.Process, stdio *Stdio) {
	t := p.Terminal || stdio.Terminal
	p.Terminal, stdio.Terminal = t, t
}

// Exec creates an exec process in the init's namespaces and the container's
// cgroup; it runs after StartProcess.
func (c *Container) Exec(ctx context.Context, execID string, processJSON []byte, stdio Stdio) (*Process, error) {
	if execID == "" {
		return nil, fmt.Errorf("exec id is empty: %w", errdefs.ErrInvalidArgument)
	}
	proc, err := parseProcess(processJSON)
	if err != nil {
		return nil, err
	}
	withTerminal(proc, &stdio)
	c.mu.Lock()
	if c.deleted {
		c.mu.Unlock()
		return nil, fmt.Errorf("container %q is being deleted: %w", c.ID, errdefs.ErrFailedPrecondition)
	}
	if _, ok := c.execs[execID]; ok {
		c.mu.Unlock()
		return nil, fmt.Errorf("exec %q: %w", execID, errdefs.ErrAlreadyExists)
	}
	c.execs[execID] = nil // reserved
	c.mu.Unlock()
	release := func() {
		c.mu.Lock()
		delete(c.execs, execID)
		c.mu.Unlock()
	}
	if st := c.init.State(); st != Running && st != Created {
		release()
		return nil, fmt.Errorf("container %q init is %s: %w", c.ID, st, errdefs.ErrFailedPrecondition)
	}
	nsTypes, nsFiles, err := helperNamespaces(c.init.Pid())
	if err != nil {
		release()
		return nil, fmt.Errorf("container %q: %v: %w", c.ID, err, errdefs.ErrFailedPrecondition)
	}
	defer func() {
		for _, f := range nsFiles {
			f.Close()
		}
	}()
	p, err := spawn(ctx, c.m.reaper, c.m.streams, spawnSpec{
		cfg:      &helperConfig{Process: proc, Join: nsTypes, Seccomp: c.seccomp},
		stdio:    stdio,
		join:     execJoins(c.init.Pid()),
		cgroupFD: c.cgFD,
		// The container may be paused (see spawnSpec.joinCgroupLate).
		joinCgroupLate: true,
		helperNS:       nsFiles,
	})
	if err != nil {
		release()
		return nil, fmt.Errorf("exec %s in %s: %w", execID, c.ID, err)
	}
	p.ID = execID
	c.mu.Lock()
	c.execs[execID] = p
	c.mu.Unlock()
	return p, nil
}

// DeleteProcess forgets an exec process that has exited (or never started).
func (c *Container) DeleteProcess(execID string) error {
	if execID == "" {
		return fmt.Errorf("the init process is deleted with its container: %w", errdefs.ErrInvalidArgument)
	}
	p, err := c.Process(execID)
	if err != nil {
		return err
	}
	if p == nil {
		return fmt.Errorf("exec %q is still being created: %w", execID, errdefs.ErrFailedPrecondition)
	}
	if err := p.markDeleted(); err != nil {
		return err
	}
	c.mu.Lock()
	delete(c.execs, execID)
	c.mu.Unlock()
	return nil
}

// Signal signals one process, or every process in the container's cgroup
// (SIGKILL through cgroup.kill, which also catches processes forked while
// the signal is under way).
func (c *Container) Signal(execID string, sig unix.Signal, all bool) error {
	if !all {
		p, err := c.Process(execID)
		if err != nil {
			return err
		}
		if p == nil {
			return fmt.Errorf("exec %q is still being created: %w", execID, errdefs.ErrFailedPrecondition)
		}
		return p.Signal(sig)
	}
	if sig == unix.SIGKILL {
		if err := os.WriteFile(filepath.Join(c.cgPath, "cgroup.kill"), []byte("1"), 0); err == nil {
			return nil
		}
	}
	pids, err := c.procs()
	if err != nil {
		return err
	}
	for _, pid := range pids {
		if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("kill %d: %w", pid, err)
		}
	}
	return nil
}

func (c *Container) procs() ([]int, error) {
	b, err := os.ReadFile(filepath.Join(c.cgPath, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("read cgroup.procs: %v: %w", err, errdefs.ErrUnavailable)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids, nil
}

// ProcessInfo is a pid in the container, with the exec id it belongs to.
type ProcessInfo struct {
	Pid    int
	ExecID string
}

// Pids lists the processes in the container's cgroup.
func (c *Container) Pids() ([]ProcessInfo, error) {
	pids, err := c.procs()
	if err != nil {
		return nil, err
	}
	byPid := map[int]string{}
	c.mu.Lock()
	for id, p := range c.execs {
		if p != nil {
			byPid[p.pid] = id
		}
	}
	c.mu.Unlock()
	out := make([]ProcessInfo, len(pids))
	for i, pid := range pids {
		out[i] = ProcessInfo{Pid: pid, ExecID: byPid[pid]}
	}
	return out, nil
}

// Stats reads the container's cgroup.
func (c *Container) Stats() (*stats.Metrics, error) {
	m, err := c.cg.Stat()
	if err != nil {
		return nil, fmt.Errorf("cgroup stats: %v: %w", err, errdefs.ErrUnavailable)
	}
	return m, nil
}

// Update applies new resources given as OCI LinuxResources JSON.
func (c *Container) Update(resourcesJSON []byte) error {
	var r specs.LinuxResources
	if err := json.Unmarshal(resourcesJSON, &r); err != nil {
		return fmt.Errorf("decode resources: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return c.update(&r)
}

// Pause freezes every process of the container.
func (c *Container) Pause() error {
	if err := c.cg.Freeze(); err != nil {
		return fmt.Errorf("freeze: %v: %w", err, errdefs.ErrUnknown)
	}
	return nil
}

// Resume thaws the container.
func (c *Container) Resume() error {
	if err := c.cg.Thaw(); err != nil {
		return fmt.Errorf("thaw: %v: %w", err, errdefs.ErrUnknown)
	}
	return nil
}

// initExited runs once the init has exited and drained: the kernel has
// already killed the rest of its PID namespace; execs that share the
// agent's PID namespace are killed here so nothing outlives the init.
func (c *Container) initExited(*Process) {
	if pids, err := c.procs(); err == nil && len(pids) > 0 {
		os.WriteFile(filepath.Join(c.cgPath, "cgroup.kill"), []byte("1"), 0)
	}
}

// Delete kills what remains, removes the cgroup and unmounts the root.
func (m *Manager) Delete(ctx context.Context, id string) error {
	c, err := m.Get(id)
	if err != nil {
		return err
	}
	c.deleteMu.Lock()
	defer c.deleteMu.Unlock()
	if c.gone {
		return fmt.Errorf("container %q: %w", id, errdefs.ErrNotFound)
	}
	c.mu.Lock()
	c.deleted = true
	execs := make([]*Process, 0, len(c.execs))
	for _, p := range c.execs {
		if p != nil {
			execs = append(execs, p)
		}
	}
	c.mu.Unlock()
	// A frozen cgroup cannot die.
	c.cg.Thaw()
	c.Signal("", unix.SIGKILL, true)
	c.init.proc.Signal(unix.SIGKILL)
	for _, p := range append(execs, c.init) {
		select {
		case <-p.Done():
		case <-ctx.Done():
			return fmt.Errorf("delete %s: processes did not exit: %w", id, ctx.Err())
		}
		p.release()
	}
	c.teardown()
	c.gone = true
	m.mu.Lock()
	delete(m.containers, id)
	waiting := len(m.containers) == 0 && m.spare != nil
	m.mu.Unlock()
	if waiting {
		// The VM is back to waiting for its first container (the pool's
		// warm-up container is gone; see pkg/guest/warmup.go) and is about
		// to be paused: the heap the create and delete grew goes back to
		// the guest now, not once the next GC cycle's scavenger gets to
		// it. It is the agent's RSS in every pooled VM.
		debug.FreeOSMemory()
	}
	return nil
}

// teardown removes the cgroup and unmounts the root (best effort: it is also
// the cleanup of a failed Create).
func (c *Container) teardown() {
	if c.stopOOM != nil {
		c.stopOOM()
	}
	if c.cgFD >= 0 {
		unix.Close(c.cgFD)
		c.cgFD = -1
	}
	if c.cg != nil {
		// Exited processes leave the cgroup at once, but a kill may still be
		// landing: retry for a moment.
		deadline := time.Now().Add(2 * time.Second)
		for c.cg.Delete() != nil && time.Now().Before(deadline) {
			os.WriteFile(filepath.Join(c.cgPath, "cgroup.kill"), []byte("1"), 0)
			time.Sleep(20 * time.Millisecond)
		}
	}
	for i := len(c.mounted) - 1; i >= 0; i-- {
		unix.Unmount(c.mounted[i], unix.MNT_DETACH)
	}
	c.mounted = nil
	c.unmountDevices()
	for _, tag := range c.shares {
		c.m.releaseShare(tag)
	}
	c.shares = nil
	// Never RemoveAll: if an unmount failed, the share's files (the host's)
	// would be deleted through it.
	if c.shmDir != "" {
		os.Remove(c.shmDir)
	}
	os.Remove(c.rootfs)
	os.Remove(c.dir)
}

// Shutdown kills and deletes every container, bounded by ctx.
func (m *Manager) Shutdown(ctx context.Context) {
	for _, c := range m.List() {
		m.Delete(ctx, c.ID)
	}
}

// MountsReady reports whether the kernel modules mounts need are loaded
// (always true when nothing is loaded at boot).
func (m *Manager) MountsReady() bool {
	if m.cfg.MountsReady == nil {
		return true
	}
	select {
	case <-m.cfg.MountsReady:
		return true
	default:
		return false
	}
}
