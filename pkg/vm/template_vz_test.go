package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// vzKey is the template key of cfg under Virtualization.framework.
func vzKey(t *testing.T, cfg Config) string {
	t.Helper()
	m, err := newVZMachine(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	in, err := m.templateInputs()
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := in.key()
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// vzTestConfig is a container VM with a datagram NIC (a real socketpair,
// as the NAT stack's) and two disks (a writable layer, a read-only one).
func vzTestConfig(t *testing.T) Config {
	t.Helper()
	dir := t.TempDir()
	kernel := filepath.Join(dir, "Image")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	var disks []Disk
	for i, ro := range []bool{false, true} {
		p := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		if err := os.WriteFile(p, make([]byte, 64<<10), 0o600); err != nil {
			t.Fatal(err)
		}
		disks = append(disks, Disk{Path: p, ReadOnly: ro})
	}
	stack, nic, err := NewDatagramPair("stack", "nic")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stack.Close(); nic.Close() })
	return Config{
		ID: "c", StateDir: t.TempDir(), Kernel: kernel,
		Shares: []Share{{Tag: "shared", HostPath: t.TempDir()}},
		Disks:  disks,
		NICs:   []NIC{{Kind: NICDatagram, File: nic, MAC: net.HardwareAddr{0x0a, 0x58, 0x0a, 0x63, 0, 5}}},
	}
}

// The vz key counts NICs by number and kind and disks by number, order and
// read-only flag, as QEMU's does; a container's socket, MAC and image
// files are not in it.
func TestVZTemplateKeyDevices(t *testing.T) {
	cfg := vzTestConfig(t)
	key := vzKey(t, cfg)

	other := vzTestConfig(t) // other files, socket and MAC...
	other.Kernel = cfg.Kernel
	other.NICs[0].MAC = net.HardwareAddr{0x0a, 0x58, 0x0a, 0x63, 0, 9}
	if k := vzKey(t, other); k != key {
		t.Errorf("another container's socket, MAC, images and share changed the key")
	}
	noMAC := cfg
	noMAC.NICs = []NIC{{Kind: NICDatagram, File: cfg.NICs[0].File}}
	if k := vzKey(t, noMAC); k != key {
		t.Errorf("a NIC without a MAC changed the key")
	}

	for name, change := range map[string]func(c *Config){
		"no NIC":         func(c *Config) { c.NICs = nil },
		"two NICs":       func(c *Config) { c.NICs = []NIC{c.NICs[0], c.NICs[0]} },
		"no disk":        func(c *Config) { c.Disks = nil },
		"disk count":     func(c *Config) { c.Disks = c.Disks[:1] },
		"read-only flag": func(c *Config) { c.Disks = []Disk{c.Disks[0], {Path: c.Disks[1].Path}} },
		"disk order":     func(c *Config) { c.Disks = []Disk{c.Disks[1], c.Disks[0]} },
		"memory":         func(c *Config) { c.MemoryMiB = 1024 },
	} {
		c := cfg
		change(&c)
		if k := vzKey(t, c); k == key {
			t.Errorf("changing the %s kept the key", name)
		}
	}
}

func TestVZStandIns(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	nics, release, err := vzStandInNICs([]NIC{{Kind: NICDatagram, File: f, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}, {Kind: NICDatagram}})
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range nics {
		if n.Kind != NICDatagram || n.File == nil || n.File == f || n.MAC.String() != TemplateMAC(i).String() {
			t.Errorf("stand-in %d: %+v, want a new datagram socket with %s", i, n, TemplateMAC(i))
			continue
		}
		typ, err := unix.GetsockoptInt(int(n.File.Fd()), unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil || typ != unix.SOCK_DGRAM {
			t.Errorf("stand-in %d: socket type %d, %v; want SOCK_DGRAM", i, typ, err)
		}
		// Connected: a frame the guest end sends is not refused.
		if _, err := n.File.Write([]byte("frame")); err != nil {
			t.Errorf("stand-in %d: send: %v", i, err)
		}
	}
	release()
	for i, n := range nics {
		if _, err := n.File.Write([]byte("x")); !errors.Is(err, os.ErrClosed) {
			t.Errorf("stand-in %d after release: write %v, want closed", i, err)
		}
	}
	if _, _, err := vzStandInNICs([]NIC{{Kind: NICTap}}); err == nil {
		t.Error("a tap stand-in under Virtualization.framework: no error")
	}

	disk := filepath.Join(t.TempDir(), "disk0")
	os.WriteFile(disk, nil, 0o600)
	if err := vzStandInDisks([]Disk{{Path: disk}}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(disk); err != nil || fi.Size() != StandInDiskBytes {
		t.Errorf("stand-in disk: %v %v, want %d bytes", fi, err, StandInDiskBytes)
	}

	in := []NIC{{Kind: NICDatagram, File: f, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}
	out := vzCloneNICs(in)
	if out[0].File != f || out[0].MAC.String() != TemplateMAC(0).String() || in[0].MAC.String() != "02:00:00:00:00:01" {
		t.Errorf("clone NICs %+v from %+v: want the container's file with TemplateMAC(0), the input unchanged", out, in)
	}
}

// vzDeviceSig is what a saved VM's configuration must match for the fake
// to restore it, as Virtualization.framework demands: the devices' kinds,
// order, read-only flags, serials and MACs, not the files they attach.
func vzDeviceSig(p vzPlan) string {
	var b strings.Builder
	fmt.Fprintf(&b, "cpus=%d mem=%d", p.CPUs, p.MemoryBytes)
	for _, s := range p.Shares {
		fmt.Fprintf(&b, " share=%s,ro=%v", s.Tag, s.ReadOnly)
	}
	for _, d := range p.Disks {
		fmt.Fprintf(&b, " disk=%s,ro=%v", d.ID, d.ReadOnly)
	}
	for _, n := range p.NICs {
		fmt.Fprintf(&b, " nic=%s,mac=%s", n.Kind, n.MAC)
	}
	return b.String()
}

// strictFakeVZ is fakeVZ whose saved state records its configuration and
// whose restore refuses any other.
type strictFakeVZ struct {
	*fakeVZ
	plan vzPlan
	// refuse makes every restore fail, as a framework whose idea of the
	// configuration differs from ours would.
	refuse bool
}

func (f *strictFakeVZ) SaveState(path string) error {
	f.record("save")
	return os.WriteFile(path, []byte(vzDeviceSig(f.plan)), 0o600)
}

func (f *strictFakeVZ) RestoreState(path string) error {
	f.record("restore")
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if got := vzDeviceSig(f.plan); string(b) != got || f.refuse {
		return fmt.Errorf("the configuration %q is not the saved one %q", got, b)
	}
	f.states <- vzRestoring
	f.states <- vzPaused
	return nil
}

// A VM with a NIC and disks under Virtualization.framework: the template
// is built with stand-ins (a fresh datagram socket with TemplateMAC, disk
// images of StandInDiskBytes with the same flags), and a clone restores
// into the container's own socket and images with the template's MACs,
// which a framework that refuses changed configurations accepts. A restore
// the framework refuses means a cold boot with the container's MAC.
func TestVZTemplateNICsDisks(t *testing.T) {
	cfg := vzTestConfig(t)
	var mu sync.Mutex
	var made []*strictFakeVZ
	var refuse bool // guarded by mu
	create := func(p vzPlan) (vzInstance, error) {
		host, guest := net.Pipe()
		t.Cleanup(func() { guest.Close() })
		mu.Lock()
		defer mu.Unlock()
		f := &strictFakeVZ{fakeVZ: newFakeVZ(), plan: p, refuse: refuse}
		f.dials <- host
		made = append(made, f)
		// A stand-in disk is there while the template VM is created.
		for _, d := range p.Disks {
			if fi, err := os.Stat(d.Path); err != nil {
				return nil, err
			} else if strings.Contains(d.Path, ".build-") && fi.Size() != StandInDiskBytes {
				return nil, fmt.Errorf("stand-in %s has %d bytes", d.Path, fi.Size())
			}
		}
		return f, nil
	}
	last := func() *strictFakeVZ {
		mu.Lock()
		defer mu.Unlock()
		return made[len(made)-1]
	}
	var logs []string
	var misses int
	tc := &TemplateCache{
		Dir:    t.TempDir(),
		OnMiss: func(Config) { misses++ },
		Logf:   func(format string, args ...any) { logs = append(logs, fmt.Sprintf(format, args...)) },
	}
	cfg.Templates = tc
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	startVZ := func() *warmVZ {
		t.Helper()
		w := startWarmVZ(ctx, t, cfg, create)
		if _, err := w.AgentConn(ctx); err != nil {
			t.Fatalf("AgentConn: %v", err)
		}
		return w
	}

	// No template yet: cold, with the container's MAC, and a build asked for.
	if w := startVZ(); w.StartMode() != StartCold || misses != 1 {
		t.Fatalf("no template: mode %s, %d misses; log %q", w.StartMode(), misses, logs)
	}
	if got := last().plan.NICs[0].MAC.String(); got != cfg.NICs[0].MAC.String() {
		t.Errorf("cold VM NIC MAC %s, want the container's %s", got, cfg.NICs[0].MAC)
	}

	// The build, from a job as the detached builder gets it: no NIC files.
	job := cfg
	job.Templates = nil
	job.NICs = []NIC{{Kind: NICDatagram, MAC: cfg.NICs[0].MAC}}
	if err := tc.buildVZ(ctx, job, create); err != nil {
		t.Fatalf("build: %v", err)
	}
	tmpl := last()
	if got := strings.Join(tmpl.called(), ","); !strings.HasPrefix(got, "start,pause,save") {
		t.Fatalf("template VM calls %s, want start,pause,save then a stop", got)
	}
	if n := tmpl.plan.NICs; len(n) != 1 || n[0].File == nil || n[0].File == cfg.NICs[0].File || n[0].MAC.String() != TemplateMAC(0).String() {
		t.Errorf("template NICs %+v, want a stand-in socket with %s", n, TemplateMAC(0))
	} else if _, err := n[0].File.Write([]byte("x")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("the template's stand-in NIC is still open after the build: %v", err)
	}
	if d := tmpl.plan.Disks; len(d) != 2 || d[0].ReadOnly || !d[1].ReadOnly || d[0].Path == cfg.Disks[0].Path || d[1].ID != "disk1" {
		t.Errorf("template disks %+v, want stand-ins with the container's flags", d)
	}
	for _, d := range tmpl.plan.Disks {
		if _, err := os.Stat(d.Path); !os.IsNotExist(err) {
			t.Errorf("stand-in %s left behind: %v", d.Path, err)
		}
	}

	// A clone: restored into the container's socket and images, with the
	// template's MAC (the agent sets the container's, see forClone).
	w := startVZ()
	clone := last()
	if w.StartMode() != StartTemplate || strings.Join(clone.called(), ",") != "restore,resume" || misses != 1 {
		t.Fatalf("with a template: mode %s, calls %v, %d misses; log %q", w.StartMode(), clone.called(), misses, logs)
	}
	if n := clone.plan.NICs[0]; n.File != cfg.NICs[0].File || n.MAC.String() != TemplateMAC(0).String() {
		t.Errorf("clone NIC %+v, want the container's socket with %s", n, TemplateMAC(0))
	}
	if d := clone.plan.Disks; d[0].Path != cfg.Disks[0].Path || d[1].Path != cfg.Disks[1].Path {
		t.Errorf("clone disks %+v, want the container's images", d)
	}
	if cfg.NICs[0].MAC.String() != "0a:58:0a:63:00:05" {
		t.Errorf("starting a clone changed the caller's NIC MAC to %s", cfg.NICs[0].MAC)
	}

	// The framework refuses the restore: a cold boot with the container's
	// MAC, a log line, the template removed and a rebuild asked for.
	mu.Lock()
	refuse = true
	mu.Unlock()
	logs = nil
	w = startVZ()
	if w.StartMode() != StartCold || misses != 2 || last().plan.NICs[0].MAC.String() != cfg.NICs[0].MAC.String() {
		t.Fatalf("refused restore: mode %s, %d misses, MAC %s", w.StartMode(), misses, last().plan.NICs[0].MAC)
	}
	if !strings.Contains(strings.Join(logs, "\n"), "restoring template") {
		t.Errorf("no log line for the refused restore: %q", logs)
	}
}

// A configuration the framework cannot save fails the build before the
// template VM boots.
func TestVZTemplateUnsavable(t *testing.T) {
	cfg := vzTestConfig(t)
	var made []*fakeVZ
	create := func(vzPlan) (vzInstance, error) {
		f := newFakeVZ()
		f.saveErr = fmt.Errorf("save/restore: %w: file handle attachments cannot be saved", errdefs.ErrFailedPrecondition)
		made = append(made, f)
		return f, nil
	}
	tc := &TemplateCache{Dir: t.TempDir(), Logf: t.Logf}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := tc.buildVZ(ctx, cfg, create)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "cannot be saved") {
		t.Fatalf("build: %v, want the framework's refusal", err)
	}
	if len(made) != 1 || len(made[0].called()) != 0 {
		t.Errorf("template VM calls %v, want none (no boot)", made[0].called())
	}
	if ents, _ := filepath.Glob(filepath.Join(tc.Dir, "[0-9a-f]*")); len(ents) != 1 || !strings.HasSuffix(ents[0], ".lock") {
		t.Errorf("cache holds %v after a refused build, want the lock file only", ents)
	}
}

// Restores that the framework keeps refusing: each removes the template
// and asks for a rebuild, up to vzMaxRestoreFailures; then VMs of that
// configuration boot cold without asking, with a log line, until the
// system version changes or a restore succeeds.
func TestVZTemplateRefusedRestore(t *testing.T) {
	cfg := vzTestConfig(t)
	var mu sync.Mutex
	refuse := true // guarded by mu
	var made []*strictFakeVZ
	create := func(p vzPlan) (vzInstance, error) {
		host, guest := net.Pipe()
		t.Cleanup(func() { guest.Close() })
		mu.Lock()
		defer mu.Unlock()
		for _, d := range p.Disks {
			if _, err := os.Stat(d.Path); err != nil {
				return nil, err // as the framework's attachment does
			}
		}
		f := &strictFakeVZ{fakeVZ: newFakeVZ(), plan: p, refuse: refuse}
		f.dials <- host
		made = append(made, f)
		return f, nil
	}
	restores := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, f := range made {
			if slicesContain(f.called(), "restore") {
				n++
			}
		}
		return n
	}
	system := "macOS 15.1 (24B83)"
	old := vzSystemVersion
	vzSystemVersion = func() string { return system }
	t.Cleanup(func() { vzSystemVersion = old })

	var logs []string
	misses := 0
	tc := &TemplateCache{
		Dir:    t.TempDir(),
		OnMiss: func(Config) { misses++ },
		Logf:   func(format string, args ...any) { logs = append(logs, fmt.Sprintf(format, args...)) },
	}
	cfg.Templates = tc
	job := cfg
	job.Templates = nil
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := func() StartMode {
		t.Helper()
		return startWarmVZ(ctx, t, cfg, create).StartMode()
	}
	build := func() {
		t.Helper()
		if err := tc.buildVZ(ctx, job, create); err != nil {
			t.Fatalf("build: %v", err)
		}
	}

	// A clone and a cold boot that both fail (the container's image is
	// gone, say) do not count against the template.
	build()
	mu.Lock()
	created := len(made)
	mu.Unlock()
	broken := cfg
	broken.Disks = []Disk{{Path: "/nonexistent/disk0.img"}, cfg.Disks[1]}
	if w, err := newWarmVZ(broken, create); err != nil {
		t.Fatal(err)
	} else if err := w.Start(ctx); err == nil {
		t.Fatal("Start with a missing disk image worked")
	}
	mu.Lock()
	if len(made) != created {
		t.Errorf("a VM was created for a missing disk image")
	}
	mu.Unlock()
	if _, err := os.Stat(tc.refusalPath(vzKey(t, cfg))); !os.IsNotExist(err) || misses != 0 {
		t.Fatalf("a failed clone whose cold boot failed too was counted as a refusal (%v, %d misses)", err, misses)
	}

	build()
	if m := start(); m != StartCold || misses != 1 || restores() != 1 {
		t.Fatalf("first refusal: mode %s, %d misses, %d restores; want cold, a rebuild asked", m, misses, restores())
	}
	build()
	if m := start(); m != StartCold || misses != 1 || restores() != 2 {
		t.Fatalf("second refusal: mode %s, %d misses, %d restores; want cold, no rebuild", m, misses, restores())
	}
	build() // a builder started meanwhile (another shim) may still save one
	logs = nil
	if m := start(); m != StartCold || misses != 1 || restores() != 2 {
		t.Fatalf("given up: mode %s, %d misses, %d restores; want cold without a restore or a rebuild", m, misses, restores())
	}
	if _, err := os.Stat(tc.dir(vzKey(t, cfg))); !os.IsNotExist(err) {
		t.Errorf("the template saved after the give-up is still there: %v", err)
	}
	if l := strings.Join(logs, "\n"); !strings.Contains(l, "failed 2 times on this system") || !strings.Contains(l, ".refused") {
		t.Errorf("given-up log %q lacks the count or the record to remove", l)
	}

	// A new system version tries again (the given-up template is gone,
	// so a build is asked for); a restore that works clears the record.
	system = "macOS 15.2 (24C101)"
	mu.Lock()
	refuse = false
	mu.Unlock()
	if m := start(); m != StartCold || misses != 2 {
		t.Fatalf("after an update, no template: mode %s, %d misses; want cold and a build asked for", m, misses)
	}
	build()
	if m := start(); m != StartTemplate || restores() != 3 {
		t.Fatalf("after an update: mode %s, %d restores; want a template clone", m, restores())
	}
	if _, err := os.Stat(tc.refusalPath(vzKey(t, cfg))); !os.IsNotExist(err) {
		t.Errorf("the refusal record outlived a successful restore: %v", err)
	}
}
