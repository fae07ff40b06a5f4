// Package guest_test boots real VMs under QEMU with the guest agent as PID 1
// and drives the agent protocol from the host, checking what containers see
// and print byte for byte. It needs the boot files (make boot) and is run by
// `make test-vm`, which sets MACVM_BOOT_DIR.
package guest_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/macvm/macvm/pkg/guest"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/guest/transport"
	"github.com/macvm/macvm/pkg/vm"
)

// rpcTimeout bounds one RPC; TCG is slow but not this slow.
const rpcTimeout = 60 * time.Second

// rootfsTag is the 9p tag of the shared busybox root filesystem; dataTag
// the tag of a second share used as a volume.
const (
	rootfsTag = "rootfs"
	dataTag   = "data"
)

// testVM is one booted VM with a connected agent client.
type testVM struct {
	m      vm.Machine
	client *guest.Client
	rootfs string
	// data is a second host directory shared as dataTag (a volume).
	data    string
	boot    time.Duration
	streamN atomic.Int64
}

// bootDir returns MACVM_BOOT_DIR or fails the test: these tests must never
// pass silently on a machine that did not build the boot files.
func bootDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("MACVM_BOOT_DIR")
	if dir == "" {
		t.Fatal("MACVM_BOOT_DIR is not set: run `make test-vm` (it builds _output/boot and sets it)")
	}
	for _, f := range []string{"vmlinux", "initrd.img"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("boot file missing (run `make boot`): %v", err)
		}
	}
	return dir
}

// busyboxRootfs builds a root filesystem from the host's static busybox
// with one hard link per applet.
func busyboxRootfs(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp", "etc", "root"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(root, "tmp"), 0o1777)
	bb := filepath.Join(root, "bin", "busybox")
	src, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("busybox-static is needed: %v", err)
	}
	if err := os.WriteFile(bb, src, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" {
			continue
		}
		if err := os.Link(bb, filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc", "group"), []byte("root:x:0:\n"), 0o644)
	return root
}

// bootVM starts a VM sharing a fresh busybox rootfs and connects to its
// agent. The VM is shut down through the agent when the test ends.
func bootVM(t *testing.T) *testVM {
	t.Helper()
	return bootVMWith(t, nil)
}

// vmConfig is the configuration of the tests' VMs with a fresh busybox
// rootfs and data directory.
func vmConfig(t testing.TB) vm.Config {
	t.Helper()
	dir := bootDir(t)
	state, err := os.MkdirTemp("", "macvm-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	return vm.Config{
		ID:        "e2e-" + t.Name(),
		StateDir:  state,
		Kernel:    filepath.Join(dir, "vmlinux"),
		Initrd:    filepath.Join(dir, "initrd.img"),
		CPUs:      2,
		MemoryMiB: 512,
		Shares:    []vm.Share{{Tag: rootfsTag, HostPath: busyboxRootfs(t)}, {Tag: dataTag, HostPath: t.TempDir()}},
	}
}

// bootVMWith is bootVM with the VM of cfg (nil: vmConfig's), started by
// vm.NewQEMUMachine (so cfg.Templates makes it a warm start).
func bootVMWith(t *testing.T, cfg *vm.Config) *testVM {
	t.Helper()
	if cfg == nil {
		c := vmConfig(t)
		cfg = &c
	}
	rootfs, data := cfg.Shares[0].HostPath, cfg.Shares[1].HostPath
	m, err := vm.NewQEMUMachine(*cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatalf("start VM: %v", err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		m.Stop(sctx)
	})
	conn, err := m.AgentConn(ctx)
	if err != nil {
		t.Fatalf("agent channel: %v", err)
	}
	// As the shim connects (backend_linux.go): a clone's agent resumes
	// inside its template build's session, which the padded first SYNC ends.
	var opts []transport.Option
	if vm.StartModeOf(m) != vm.StartCold {
		opts = append(opts, transport.WithStaleSession())
	}
	client, err := guest.NewClient(ctx, conn, opts...)
	if err != nil {
		t.Fatalf("connect to agent: %v\nconsole:\n%s", err, m.ConsoleTail(4096))
	}
	if _, err := client.Info(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("Info: %v\nconsole:\n%s", err, m.ConsoleTail(4096))
	}
	v := &testVM{m: m, client: client, rootfs: rootfs, data: data, boot: time.Since(m.BootStarted())}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		client.Shutdown(sctx, &emptypb.Empty{})
		client.Close()
	})
	return v
}

func rpcCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	t.Cleanup(cancel)
	return ctx
}

// defaultSpec is close to containerd's default Linux spec: the usual
// mounts, fresh namespaces, the default capability set, masked paths.
func defaultSpec(args ...string) *specs.Spec {
	caps := []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
		"CAP_KILL", "CAP_AUDIT_WRITE"}
	return &specs.Spec{
		Version:  specs.Version,
		Hostname: "e2e",
		Root:     &specs.Root{Path: "rootfs"},
		Process: &specs.Process{
			Args: args,
			Env:  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"},
			Cwd:  "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
			NoNewPrivileges: true,
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"ro", "nosuid", "noexec", "nodev"}},
			{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
				{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace}, {Type: specs.CgroupNamespace},
			},
			MaskedPaths:   []string{"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
		},
	}
}

// withoutNamespace drops one namespace type from a spec (e.g. to share the
// VM's PID namespace).
func withoutNamespace(s *specs.Spec, t specs.LinuxNamespaceType) *specs.Spec {
	var out []specs.LinuxNamespace
	for _, ns := range s.Linux.Namespaces {
		if ns.Type != t {
			out = append(out, ns)
		}
	}
	s.Linux.Namespaces = out
	return s
}

// proc is a process's host side: its streams and collected output.
type proc struct {
	t                  testing.TB
	cid, eid           string
	stdin              net.Conn
	stdout, stderr     *collector
	stdinN, outN, errN string
}

// collector reads a stream to EOF in the background.
type collector struct {
	mu   sync.Mutex // guards buf
	buf  bytes.Buffer
	done chan struct{}
}

func collect(c net.Conn) *collector {
	col := &collector{done: make(chan struct{})}
	go func() {
		defer close(col.done)
		b := make([]byte, 64<<10)
		for {
			n, err := c.Read(b)
			col.mu.Lock()
			col.buf.Write(b[:n])
			col.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return col
}

func (c *collector) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// wait returns everything once the stream reached EOF.
func (c *collector) wait(t testing.TB) string {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(rpcTimeout):
		t.Fatalf("stream not closed after %v; got so far %q", rpcTimeout, c.String())
	}
	return c.String()
}

// waitFor polls until the output contains s.
func (c *collector) waitFor(t testing.TB, s string) {
	t.Helper()
	deadline := time.Now().Add(rpcTimeout)
	for !strings.Contains(c.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("output never contained %q; got %q", s, c.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// openStdio opens the streams for one process: stdin if withStdin, stdout,
// and stderr unless terminal.
func (v *testVM) openStdio(t testing.TB, withStdin, terminal bool) (*proc, *agent.Stdio) {
	t.Helper()
	n := v.streamN.Add(1)
	p := &proc{t: t}
	st := &agent.Stdio{Terminal: terminal}
	open := func(kind string) net.Conn {
		name := fmt.Sprintf("p%d-%s", n, kind)
		c, err := v.client.OpenStream(name)
		if err != nil {
			t.Fatalf("open stream %s: %v", name, err)
		}
		t.Cleanup(func() { c.Close() })
		switch kind {
		case "stdin":
			st.Stdin = name
		case "stdout":
			st.Stdout = name
		case "stderr":
			st.Stderr = name
		}
		return c
	}
	if withStdin {
		p.stdin = open("stdin")
	}
	p.stdout = collect(open("stdout"))
	if !terminal {
		p.stderr = collect(open("stderr"))
	}
	return p, st
}

// create creates a container on the shared rootfs and returns its init.
func (v *testVM) create(t testing.TB, id string, spec *specs.Spec, withStdin bool) *proc {
	t.Helper()
	return v.createOn(t, id, spec, withStdin, nil, []*agent.Mount{{Type: "9p", Source: rootfsTag, Options: []string{"trans=virtio", "version=9p2000.L", "msize=512000"}}})
}

// createOn creates a container whose root filesystem is made of devices
// and rootfs.
func (v *testVM) createOn(t testing.TB, id string, spec *specs.Spec, withStdin bool, devices []*agent.BlockDevice, rootfs []*agent.Mount) *proc {
	t.Helper()
	p, st := v.openStdio(t, withStdin, spec.Process.Terminal)
	p.cid = id
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.client.CreateContainer(rpcCtx(t), &agent.CreateContainerRequest{
		ContainerId:  id,
		Spec:         b,
		Rootfs:       rootfs,
		BlockDevices: devices,
		Stdio:        st,
	})
	if err != nil {
		t.Fatalf("CreateContainer %s: %v\nconsole:\n%s", id, err, v.m.ConsoleTail(2048))
	}
	t.Cleanup(func() {
		// Bounded: a test that failed on a hung guest must still end.
		ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
		defer cancel()
		v.client.DeleteContainer(ctx, &agent.DeleteContainerRequest{ContainerId: id})
	})
	return p
}

// exec creates an exec process in a container.
func (v *testVM) exec(t testing.TB, cid, eid string, process *specs.Process, withStdin bool) *proc {
	t.Helper()
	return v.execStdio(t, cid, eid, process, withStdin, process.Terminal)
}

// execStdio is exec with the stdio's terminal flag chosen apart from the
// process spec's, as containerd's client sends it.
func (v *testVM) execStdio(t testing.TB, cid, eid string, process *specs.Process, withStdin, terminal bool) *proc {
	t.Helper()
	p, st := v.openStdio(t, withStdin, terminal)
	p.cid, p.eid = cid, eid
	b, _ := json.Marshal(process)
	if _, err := v.client.ExecProcess(rpcCtx(t), &agent.ExecProcessRequest{ContainerId: cid, ExecId: eid, Process: b, Stdio: st}); err != nil {
		t.Fatalf("ExecProcess %s/%s: %v\nconsole:\n%s", cid, eid, err, v.m.ConsoleTail(2048))
	}
	return p
}

func (v *testVM) start(t testing.TB, p *proc) uint32 {
	t.Helper()
	resp, err := v.client.StartProcess(rpcCtx(t), &agent.StartProcessRequest{ContainerId: p.cid, ExecId: p.eid})
	if err != nil {
		t.Fatalf("StartProcess %s/%s: %v", p.cid, p.eid, err)
	}
	return resp.Pid
}

func (v *testVM) wait(t testing.TB, p *proc) uint32 {
	t.Helper()
	resp, err := v.client.WaitProcess(rpcCtx(t), &agent.WaitProcessRequest{ContainerId: p.cid, ExecId: p.eid})
	if err != nil {
		t.Fatalf("WaitProcess %s/%s: %v", p.cid, p.eid, err)
	}
	return resp.ExitStatus
}

// run creates, starts and waits for a container's init and returns its
// output and exit status.
func (v *testVM) run(t testing.TB, id string, spec *specs.Spec) (stdout, stderr string, status uint32) {
	t.Helper()
	p := v.create(t, id, spec, false)
	v.start(t, p)
	status = v.wait(t, p)
	return p.stdout.wait(t), p.stderr.wait(t), status
}

func closeWrite(t testing.TB, c net.Conn) {
	t.Helper()
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		t.Fatalf("stream %T has no CloseWrite", c)
	}
	if err := cw.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
}

var _ = io.EOF
