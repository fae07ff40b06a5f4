package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestPlanVZ(t *testing.T) {
	base := Config{ID: "c1", StateDir: "/run/c1", Kernel: "/boot/Image", Initrd: "/boot/initrd.img"}
	with := func(f func(*Config)) Config { c := base; f(&c); return c }

	p, err := planVZ(with(func(c *Config) {
		c.KernelArgs = []string{"macvm.debug=1"}
		c.Shares = []Share{{Tag: "rootfs", HostPath: "/var/rootfs"}, {Tag: "vol0", HostPath: "/data", ReadOnly: true}}
		c.Disks = []Disk{{Path: "/img/layer0.erofs", ReadOnly: true}, {Path: "/img/upper.ext4"}}
	}))
	if err != nil {
		t.Fatalf("planVZ: %v", err)
	}
	if p.CPUs != DefaultCPUs || p.MemoryBytes != DefaultMemoryMiB<<20 {
		t.Errorf("got %d CPUs %d bytes, want the defaults %d, %d MiB", p.CPUs, p.MemoryBytes, DefaultCPUs, DefaultMemoryMiB)
	}
	if p.MemoryBytes%(1<<20) != 0 {
		t.Errorf("memory %d is not a multiple of 1 MiB", p.MemoryBytes)
	}
	if p.ConsolePath != "/run/c1/console.log" || p.AgentPort != AgentVsockPort || len(p.NICs) != 0 {
		t.Errorf("console %q port %d NICs %v (a Config without NICs gets none)", p.ConsolePath, p.AgentPort, p.NICs)
	}
	if AgentVsockArg != "macvm.channel=vsock:"+strconv.Itoa(AgentVsockPort) {
		t.Errorf("AgentVsockArg %q does not name port %d", AgentVsockArg, AgentVsockPort)
	}
	for _, want := range []string{"console=hvc0 ", " rdinit=/init ", " " + AgentVsockArg + " "} {
		if !strings.Contains(p.Cmdline, want) {
			t.Errorf("cmdline %q lacks %q", p.Cmdline, want)
		}
	}
	if !strings.HasSuffix(p.Cmdline, " macvm.debug=1") {
		t.Errorf("cmdline %q: caller's arguments must come last", p.Cmdline)
	}
	for _, bad := range []string{"ttyS0", "tsc", "8250", "serial:"} {
		if strings.Contains(p.Cmdline, bad) {
			t.Errorf("cmdline %q has x86/QEMU-only %q", p.Cmdline, bad)
		}
	}
	if len(p.Shares) != 2 || !p.Shares[1].ReadOnly {
		t.Errorf("shares %+v", p.Shares)
	}
	if len(p.Disks) != 2 || p.Disks[0].ID != "disk0" || p.Disks[1].ID != "disk1" || !p.Disks[0].ReadOnly || p.Disks[1].ReadOnly {
		t.Errorf("disks %+v", p.Disks)
	}

	p, err = planVZ(with(func(c *Config) { c.CPUs, c.MemoryMiB = 4, 1024 }))
	if err != nil || p.CPUs != 4 || p.MemoryBytes != 1<<30 {
		t.Errorf("4 CPUs 1 GiB: %+v %v", p, err)
	}

	bad := []struct {
		name string
		cfg  Config
	}{
		{"no state dir", with(func(c *Config) { c.StateDir = "" })},
		{"no kernel", with(func(c *Config) { c.Kernel = "" })},
		{"hypervisor", with(func(c *Config) { c.Hypervisor = "qemu-system-aarch64" })},
		{"negative memory", with(func(c *Config) { c.MemoryMiB = -1 })},
		{"long tag", with(func(c *Config) { c.Shares = []Share{{Tag: strings.Repeat("t", 36), HostPath: "/x"}} })},
		{"bad tag", with(func(c *Config) { c.Shares = []Share{{Tag: "a,b", HostPath: "/x"}} })},
		{"dup tag", with(func(c *Config) { c.Shares = []Share{{Tag: "a", HostPath: "/x"}, {Tag: "a", HostPath: "/y"}} })},
		{"relative share", with(func(c *Config) { c.Shares = []Share{{Tag: "a", HostPath: "x"}} })},
		{"relative disk", with(func(c *Config) { c.Disks = []Disk{{Path: "d.img"}} })},
	}
	for _, tt := range bad {
		if _, err := planVZ(tt.cfg); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: got %v, want ErrInvalidArgument", tt.name, err)
		}
	}
}

// fakeVZ behaves like a Virtualization.framework VM as far as the machine
// can tell: state changes on one channel, blocking calls, a vsock listener
// whose Accept ignores Close.
type fakeVZ struct {
	states   chan vzState
	dials    chan net.Conn // what the fake guest dials
	startErr error
	saveErr  error // what SaveSupported says
	// onRequestStop and onStop run when asked; nil means "guest ignores it".
	onRequestStop func(f *fakeVZ)

	mu       sync.Mutex // guards calls
	calls    []string
	listened uint32
}

func newFakeVZ() *fakeVZ {
	return &fakeVZ{states: make(chan vzState, 16), dials: make(chan net.Conn, 4)}
}

func (f *fakeVZ) record(c string) {
	f.mu.Lock()
	f.calls = append(f.calls, c)
	f.mu.Unlock()
}

func (f *fakeVZ) called() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string{}, f.calls...)
}

func (f *fakeVZ) Start() error {
	f.record("start")
	if f.startErr != nil {
		f.states <- vzStarting
		f.states <- vzStopped
		return f.startErr
	}
	f.states <- vzStarting
	f.states <- vzRunning
	return nil
}
func (f *fakeVZ) Pause() error {
	f.record("pause")
	f.states <- vzPaused
	return nil
}
func (f *fakeVZ) Resume() error {
	f.record("resume")
	f.states <- vzRunning
	return nil
}
func (f *fakeVZ) RequestStop() (bool, error) {
	f.record("request-stop")
	if f.onRequestStop != nil {
		f.onRequestStop(f)
	}
	return true, nil
}
func (f *fakeVZ) Stop() error {
	f.record("stop")
	f.states <- vzStopped
	return nil
}
func (f *fakeVZ) StateChanges() <-chan vzState { return f.states }
func (f *fakeVZ) SaveSupported() error         { return f.saveErr }
func (f *fakeVZ) SaveState(path string) error {
	f.record("save")
	return os.WriteFile(path, []byte("saved VM"), 0o600)
}
func (f *fakeVZ) RestoreState(path string) error {
	f.record("restore")
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "saved VM" {
		f.states <- vzRestoring
		f.states <- vzError
		return fmt.Errorf("restore: bad state file: %v", err)
	}
	f.states <- vzRestoring
	f.states <- vzPaused
	return nil
}
func (f *fakeVZ) Listen(port uint32) (vzListener, error) {
	f.mu.Lock()
	f.listened = port
	f.mu.Unlock()
	return fakeListener{f.dials}, nil
}

// fakeListener's Accept, like vz's, is not woken by Close.
type fakeListener struct{ c chan net.Conn }

func (l fakeListener) Accept() (net.Conn, error) { return <-l.c, nil }
func (l fakeListener) Close() error              { return nil }

func newTestVZ(t *testing.T, f *fakeVZ) *vzMachine {
	t.Helper()
	m, err := newVZMachine(Config{ID: "t", StateDir: t.TempDir(), Kernel: "/k"}, func(vzPlan) (vzInstance, error) { return f, nil })
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestVZLifecycle(t *testing.T) {
	f := newFakeVZ()
	m := newTestVZ(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if _, err := m.AgentConn(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("AgentConn before Start: %v", err)
	}
	if err := m.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := m.Start(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("second Start: %v", err)
	}
	if f.listened != AgentVsockPort {
		t.Errorf("listened on %d, want %d", f.listened, AgentVsockPort)
	}

	// The guest dials: AgentConn returns that connection, every time.
	host, guest := net.Pipe()
	defer guest.Close()
	f.dials <- host
	c1, err := m.AgentConn(ctx)
	if err != nil || c1 != host {
		t.Fatalf("AgentConn: %v %v", c1, err)
	}
	c2, err := m.AgentConn(ctx)
	if err != nil || c2 != c1 {
		t.Fatalf("second AgentConn: %v %v, want the same conn", c2, err)
	}

	if err := m.Pause(ctx); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	if err := m.Resume(ctx); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	select {
	case <-m.Done():
		t.Fatal("done while running")
	default:
	}

	// The guest powers off when asked: a clean exit, no hard stop.
	f.onRequestStop = func(f *fakeVZ) { f.states <- vzStopping; f.states <- vzStopped }
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	<-m.Done()
	if err := m.Err(); err != nil {
		t.Errorf("Err after power-off: %v", err)
	}
	if got, want := strings.Join(f.called(), ","), "start,pause,resume,request-stop"; got != want {
		t.Errorf("calls %s, want %s", got, want)
	}
	if err := m.Pause(ctx); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Pause after exit: %v", err)
	}
	if err := m.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestVZHardStop(t *testing.T) {
	f := newFakeVZ() // the guest ignores RequestStop
	m := newTestVZ(t, f)
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 5*time.Second {
		t.Errorf("Stop took %s, want about the 200ms grace", d)
	}
	if err := m.Err(); !errors.Is(err, errdefs.ErrAborted) {
		t.Errorf("Err after hard stop: %v, want ErrAborted", err)
	}
	if got, want := strings.Join(f.called(), ","), "start,request-stop,stop"; got != want {
		t.Errorf("calls %s, want %s", got, want)
	}
}

func TestVZGuestExit(t *testing.T) {
	for _, tt := range []struct {
		name    string
		console string
		final   vzState
		want    error // nil: clean
	}{
		{"power-off", "reboot: Power down\n", vzStopped, nil},
		{"panic", "Kernel panic - not syncing: Attempted to kill init!\n", vzStopped, errdefs.ErrUnavailable},
		{"framework error", "", vzError, errdefs.ErrUnavailable},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeVZ()
			m := newTestVZ(t, f)
			if err := m.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(m.cfg.StateDir, "console.log"), []byte(tt.console), 0o644); err != nil {
				t.Fatal(err)
			}
			f.states <- tt.final
			select {
			case <-m.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("no exit reported")
			}
			err := m.Err()
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("Err %v, want %v", err, tt.want)
			}
			if tt.console != "" && tt.want != nil && !strings.Contains(err.Error(), strings.TrimSpace(tt.console)) {
				t.Errorf("Err %q lacks the console tail", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			if _, err := m.AgentConn(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("AgentConn after exit: %v, want the exit", err)
			}
		})
	}
}

func TestVZStartFails(t *testing.T) {
	f := newFakeVZ()
	f.startErr = errors.New("Invalid virtual machine configuration")
	m := newTestVZ(t, f)
	err := m.Start(context.Background())
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "Invalid virtual machine") {
		t.Fatalf("Start: %v", err)
	}
	select {
	case <-m.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed after a failed Start")
	}
	if m.Err() == nil {
		t.Error("Err nil after a failed Start")
	}

	created := 0
	m2, _ := newVZMachine(Config{ID: "t", StateDir: t.TempDir(), Kernel: "/k"}, func(vzPlan) (vzInstance, error) {
		created++
		return nil, errors.New("no entitlement")
	})
	if err := m2.Start(context.Background()); err == nil || created != 1 {
		t.Fatalf("Start with a failing create: %v (created %d)", err, created)
	}
	<-m2.Done()
}

func TestVZAgentConnTimeout(t *testing.T) {
	f := newFakeVZ()
	m := newTestVZ(t, f)
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(m.cfg.StateDir, "console.log"), []byte("agent: cannot open vsock"), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := m.AgentConn(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "cannot open vsock") {
		t.Fatalf("AgentConn: %v, want a deadline error with the console tail", err)
	}
	stopCtx, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	m.Stop(stopCtx)
}

// Warm start under Virtualization.framework, on the fake: a miss boots
// cold and asks for a build; the build saves a paused VM; the next VM is
// restored and resumed instead of booted; a damaged template means a cold
// boot, its removal and a rebuild request.
func TestVZTemplate(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "Image")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var made []*fakeVZ
	create := func(vzPlan) (vzInstance, error) {
		f := newFakeVZ()
		host, guest := net.Pipe()
		t.Cleanup(func() { guest.Close() })
		f.dials <- host
		mu.Lock()
		made = append(made, f)
		mu.Unlock()
		return f, nil
	}
	last := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return made[len(made)-1].called()
	}
	var misses, readies int
	tc := &TemplateCache{
		Dir:    t.TempDir(),
		OnMiss: func(Config) { misses++ },
		Ready:  func(context.Context, net.Conn) (func(), error) { readies++; return nil, nil },
		Logf:   t.Logf,
	}
	cfg := Config{ID: "c", StateDir: t.TempDir(), Kernel: kernel, Shares: []Share{{Tag: "shared", HostPath: t.TempDir()}}, Templates: tc}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	startVZ := func() *warmVZ {
		t.Helper()
		w := startWarmVZ(ctx, t, cfg, create)
		if _, err := w.AgentConn(ctx); err != nil {
			t.Fatalf("AgentConn: %v", err)
		}
		return w
	}

	if w := startVZ(); w.StartMode() != StartCold || misses != 1 || !slicesContain(last(), "start") {
		t.Fatalf("no template: mode %s, %d misses, calls %v", w.StartMode(), misses, last())
	}
	if err := tc.buildVZ(ctx, cfg, create); err != nil {
		t.Fatalf("build: %v", err)
	}
	if got := strings.Join(last(), ","); !strings.HasPrefix(got, "start,pause,save") || readies != 1 {
		t.Fatalf("template VM calls %s, %d Ready calls; want start,pause,save then a stop", got, readies)
	}
	if w := startVZ(); w.StartMode() != StartTemplate || strings.Join(last(), ",") != "restore,resume" || misses != 1 {
		t.Fatalf("with a template: mode %s, calls %v, %d misses", w.StartMode(), last(), misses)
	}

	// Damage the saved state (its identity changes): cold, removed, rebuild asked.
	ents, _ := os.ReadDir(tc.Dir)
	var key string
	for _, e := range ents {
		if e.IsDir() {
			key = e.Name()
		}
	}
	if err := os.WriteFile(filepath.Join(tc.Dir, key, templateState), []byte("garbage!"), 0o600); err != nil {
		t.Fatal(err)
	}
	if w := startVZ(); w.StartMode() != StartCold || misses != 2 {
		t.Fatalf("damaged template: mode %s, %d misses", w.StartMode(), misses)
	}
	if _, err := os.Stat(filepath.Join(tc.Dir, key)); !os.IsNotExist(err) {
		t.Errorf("damaged template not removed: %v", err)
	}
}

func slicesContain(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func TestPlanVZNICs(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	base := Config{ID: "c1", StateDir: "/run/c1", Kernel: "/k/Image"}
	mac := net.HardwareAddr{0x0a, 0x58, 0, 0, 0, 5}
	cfg := base
	cfg.NICs = []NIC{{Kind: NICDatagram, File: f, MAC: mac}}
	p, err := planVZ(cfg)
	if err != nil {
		t.Fatalf("planVZ: %v", err)
	}
	if len(p.NICs) != 1 || p.NICs[0].File != f || p.NICs[0].MAC.String() != mac.String() {
		t.Errorf("NICs %v, want the one datagram NIC with MAC %s", p.NICs, mac)
	}
	for _, tc := range []struct {
		name string
		nic  NIC
		want error
	}{
		{"tap", NIC{Kind: NICTap, File: f}, errdefs.ErrNotImplemented},
		{"no file", NIC{Kind: NICDatagram}, errdefs.ErrInvalidArgument},
	} {
		cfg := base
		cfg.NICs = []NIC{tc.nic}
		if _, err := planVZ(cfg); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
}

// startWarmVZ starts a warm-start vz machine of cfg on the fake framework
// create and stops it when the test ends.
func startWarmVZ(ctx context.Context, t *testing.T, cfg Config, create func(vzPlan) (vzInstance, error)) *warmVZ {
	t.Helper()
	w, err := newWarmVZ(cfg, create)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		w.Stop(sctx)
	})
	return w
}
