package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// This file is the Virtualization.framework backend minus the framework:
// the translation of a Config into the devices a VM gets, and the
// lifecycle (start, agent channel, pause, stop, exit reporting) over a
// small interface that vz_darwin.go implements with github.com/Code-Hex/vz.
// Keeping it free of cgo lets it build and be tested on Linux, where vz
// cannot even be compiled.

// AgentVsockPort is the vsock port the guest agent dials on the host
// (CID 2) under Virtualization.framework. The guest dials, rather than the
// host connecting, because a host connect to a port nobody listens on yet
// fails at once and would have to be retried blindly while the guest boots;
// a guest dial is the readiness signal itself.
const AgentVsockPort = 1024

// AgentVsockArg is the agent channel on the kernel command line for vsock
// (macvm.channel=vsock:AgentVsockPort).
const AgentVsockArg = "macvm.channel=vsock:1024"

// vzMaxTagLen is Virtualization.framework's limit on a virtiofs tag
// (VZVirtioFileSystemDeviceConfiguration rejects 36 bytes and more);
// validTag's 31 is stricter, so every Share that QEMU accepts works here.
const vzMaxTagLen = 35

// vzKernelArgs are the boot parameters for a Virtualization.framework
// guest: the console is the virtio console (hvc0), and nothing x86-specific
// (TSC, 8250 UART) is assumed, since the guest is usually arm64. The
// hardening and self-tests switched off are the ones measured to cost boot
// time under QEMU (platform-facts.md); they are as pointless in a VM that
// runs one container on a Mac.
var vzKernelArgs = []string{
	"console=hvc0", "quiet", "panic=-1", "mitigations=off", "random.trust_cpu=on",
	"init_on_alloc=0", "hardened_usercopy=off", "randomize_kstack_offset=off",
	"page_alloc.shuffle=0", "cryptomgr.notests", "audit=0", "rdinit=/init",
}

// vzDisk is a Disk with the identifier the guest sees as its virtio-blk
// serial, like QEMU's serial=diskN, so the agent can match disks by index.
type vzDisk struct {
	Disk
	ID string
}

// vzPlan is everything the darwin adapter needs to build a VM
// configuration. It is plain data so that the translation is unit-tested.
type vzPlan struct {
	Kernel, Initrd string
	Cmdline        string
	CPUs           uint
	MemoryBytes    uint64
	// ConsolePath receives hvc0 (a file serial port attachment).
	ConsolePath string
	// AgentPort is where the host listens for the agent's vsock dial.
	AgentPort uint32
	// Shares become one virtiofs device each, tag = Share.Tag.
	Shares []Share
	// Disks become virtio-blk devices, raw images, cached with fsync.
	Disks []vzDisk
	// NICs become virtio-net devices over file handle attachments
	// (connected SOCK_DGRAM sockets to the shim's user-space stack).
	NICs []NIC
}

// planVZ validates cfg for Virtualization.framework and translates it.
func planVZ(cfg Config) (vzPlan, error) {
	if cfg.StateDir == "" {
		return vzPlan{}, fmt.Errorf("vm %s: no state directory: %w", cfg.ID, errdefs.ErrInvalidArgument)
	}
	if cfg.Kernel == "" {
		return vzPlan{}, fmt.Errorf("vm %s: no kernel: %w", cfg.ID, errdefs.ErrInvalidArgument)
	}
	if cfg.Hypervisor != "" {
		// The framework runs the VM for this process; there is no binary
		// to choose, and silently ignoring the setting would mislead.
		return vzPlan{}, fmt.Errorf("vm %s: hypervisor %q: Virtualization.framework has no hypervisor binary: %w",
			cfg.ID, cfg.Hypervisor, errdefs.ErrInvalidArgument)
	}
	cpus, mem := cfg.CPUs, cfg.MemoryMiB
	if cpus == 0 {
		cpus = DefaultCPUs
	}
	if mem == 0 {
		mem = DefaultMemoryMiB
	}
	if cpus < 0 || mem < 0 {
		return vzPlan{}, fmt.Errorf("vm %s: %d CPUs, %d MiB: %w", cfg.ID, cpus, mem, errdefs.ErrInvalidArgument)
	}
	p := vzPlan{
		Kernel:  cfg.Kernel,
		Initrd:  cfg.Initrd,
		Cmdline: vzCmdline(cfg.KernelArgs),
		CPUs:    uint(cpus),
		// MiB units make the framework's "multiple of 1 MiB" rule hold.
		MemoryBytes: uint64(mem) << 20,
		ConsolePath: filepath.Join(cfg.StateDir, "console.log"),
		AgentPort:   AgentVsockPort,
	}
	tags := map[string]bool{}
	for _, s := range cfg.Shares {
		if err := validTag(s.Tag); err != nil {
			return vzPlan{}, fmt.Errorf("vm %s: share %s: %w", cfg.ID, s.HostPath, err)
		}
		if len(s.Tag) > vzMaxTagLen {
			return vzPlan{}, fmt.Errorf("vm %s: share tag %q longer than %d bytes: %w", cfg.ID, s.Tag, vzMaxTagLen, errdefs.ErrInvalidArgument)
		}
		if tags[s.Tag] {
			return vzPlan{}, fmt.Errorf("vm %s: share tag %q used twice: %w", cfg.ID, s.Tag, errdefs.ErrInvalidArgument)
		}
		tags[s.Tag] = true
		if !filepath.IsAbs(s.HostPath) {
			return vzPlan{}, fmt.Errorf("vm %s: share %q: host path %q is not absolute: %w", cfg.ID, s.Tag, s.HostPath, errdefs.ErrInvalidArgument)
		}
		p.Shares = append(p.Shares, s)
	}
	for i, n := range cfg.NICs {
		// A tap is a Linux device; the framework attaches a NIC to a
		// datagram socket (or its own NAT/bridge, which macvm does not use).
		if n.Kind != NICDatagram {
			return vzPlan{}, fmt.Errorf("vm %s: NIC %d: %s NICs need QEMU on Linux: %w", cfg.ID, i, n.Kind, errdefs.ErrNotImplemented)
		}
		if n.File == nil {
			return vzPlan{}, fmt.Errorf("vm %s: NIC %d has no file: %w", cfg.ID, i, errdefs.ErrInvalidArgument)
		}
		p.NICs = append(p.NICs, n)
	}
	for i, d := range cfg.Disks {
		if !filepath.IsAbs(d.Path) {
			return vzPlan{}, fmt.Errorf("vm %s: disk %d: path %q is not absolute: %w", cfg.ID, i, d.Path, errdefs.ErrInvalidArgument)
		}
		p.Disks = append(p.Disks, vzDisk{Disk: d, ID: DiskSerial(i)})
	}
	return p, nil
}

// vzCmdline is the guest kernel command line under Virtualization.framework:
// our parameters, the vsock agent channel, then the caller's (last, so they
// win where the kernel takes the last value).
func vzCmdline(extra []string) string {
	args := append([]string{}, vzKernelArgs...)
	args = append(args, AgentVsockArg)
	args = append(args, extra...)
	return strings.Join(args, " ")
}

// vzState mirrors vz.VirtualMachineState; the adapter maps one to the
// other explicitly.
type vzState int

const (
	vzStopped vzState = iota
	vzRunning
	vzPaused
	vzError
	vzStarting
	vzPausing
	vzResuming
	vzStopping
	vzSaving
	vzRestoring
)

func (s vzState) String() string {
	names := []string{"stopped", "running", "paused", "error", "starting", "pausing", "resuming", "stopping", "saving", "restoring"}
	if int(s) >= 0 && int(s) < len(names) {
		return names[s]
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// vzInstance is what the lifecycle needs of a created (not yet started)
// Virtualization.framework VM. The framework's calls block until its
// dispatch queue has done the work and take no context, so the machine
// wraps each in its own timeout.
type vzInstance interface {
	Start() error
	Pause() error
	Resume() error
	// RequestStop asks the guest to shut down (a power-button event).
	RequestStop() (bool, error)
	// Stop pulls the plug.
	Stop() error
	// StateChanges delivers every state change, and is never closed; only
	// one goroutine may read it.
	StateChanges() <-chan vzState
	// Listen accepts guest vsock connections to port on the host.
	Listen(port uint32) (vzListener, error)
	// SaveState writes the whole state of the paused VM, RAM included,
	// to path (warm-start templates; macOS 14+ on arm64).
	SaveState(path string) error
	// RestoreState loads a saved state into the created, never started
	// VM, which is paused afterwards.
	RestoreState(path string) error
	// SaveSupported says whether the framework can save this VM's
	// configuration (ValidateSaveRestoreSupport): nil if it can, an error
	// wrapping errdefs.ErrFailedPrecondition (or ErrNotImplemented) naming
	// why not. A template build asks before booting, so a configuration
	// the framework will not save costs no boot.
	SaveSupported() error
}

// vzListener is a vsock listener whose Accept is not woken by Close (vz's
// VirtioSocketListener behaves so); the machine wraps it accordingly.
type vzListener interface {
	Accept() (net.Conn, error)
	Close() error
}

// Timeouts for framework calls that have no context of their own.
const (
	// vzStopTimeout bounds a hard stop and the wait for the stopped state
	// that follows it.
	vzStopTimeout = 10 * time.Second
	// vzConsoleTailBytes is how much console output error messages carry.
	vzConsoleTailBytes = 2048
)

// vzMachine is a Machine on Virtualization.framework. The VM runs inside
// this process's XPC helper; this process owns it, and its exit ends it.
type vzMachine struct {
	cfg  Config
	plan vzPlan
	// create builds the framework objects; vz_darwin.go supplies it.
	create func(vzPlan) (vzInstance, error)
	// restorePath, when set, is a template's saved state: Start restores
	// it and resumes instead of booting (template_vz.go).
	restorePath string
	// forTemplate makes Start refuse, before booting, a configuration the
	// framework cannot save (a template VM's).
	forTemplate bool

	done chan struct{} // closed by finish once the VM has exited
	// startReturned is closed when Start's framework call has returned, so a
	// failed Start, not the stopped state that goes with it, decides Err.
	startReturned chan struct{}
	doneOnce      sync.Once // guards closing done
	// conns carries guest connections from the accept pump; the first one
	// is the agent channel.
	conns chan net.Conn

	mu sync.Mutex // guards everything below
	// started is set by the first Start; a Machine runs once.
	started     bool
	inst        vzInstance
	listener    vzListener
	agent       net.Conn
	agentGiven  bool // AgentConn handed agent out: the caller closes it
	bootStarted time.Time
	// stopping says why the host stopped the VM, "" if it did not.
	stopping string
	err      error // why the VM exited; final once done is closed
}

var _ Machine = (*vzMachine)(nil)

func newVZMachine(cfg Config, create func(vzPlan) (vzInstance, error)) (*vzMachine, error) {
	plan, err := planVZ(cfg)
	if err != nil {
		return nil, err
	}
	return &vzMachine{
		cfg:    cfg,
		plan:   plan,
		create: create,
		done:   make(chan struct{}),
		conns:  make(chan net.Conn),

		startReturned: make(chan struct{}),
	}, nil
}

// finish records why the VM exited and closes done, once; the first
// caller's reason wins.
func (m *vzMachine) finish(err error) {
	m.doneOnce.Do(func() {
		m.mu.Lock()
		m.err = err
		l := m.listener
		m.mu.Unlock()
		close(m.done)
		if l != nil {
			l.Close()
		}
	})
}

// Start creates the VM, listens for the agent and boots it. It returns
// once the framework reports the VM running; on failure the VM is gone.
func (m *vzMachine) Start(ctx context.Context) error {
	m.mu.Lock()
	if m.started {
		m.mu.Unlock()
		return fmt.Errorf("vm %s: already started: %w", m.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	m.started = true
	m.mu.Unlock()

	inst, err := m.create(m.plan)
	if err != nil {
		err = fmt.Errorf("vm %s: %w", m.cfg.ID, err)
		m.finish(err)
		return err
	}
	if m.forTemplate {
		if err := inst.SaveSupported(); err != nil {
			err = fmt.Errorf("vm %s: template: %w", m.cfg.ID, err)
			m.finish(err)
			return err
		}
	}
	// Listen before Start: the agent may dial as soon as the guest runs.
	l, err := inst.Listen(m.plan.AgentPort)
	if err != nil {
		err = fmt.Errorf("vm %s: listen on vsock port %d: %w: %w", m.cfg.ID, m.plan.AgentPort, errdefs.ErrUnavailable, err)
		m.finish(err)
		return err
	}
	m.mu.Lock()
	m.inst = inst
	m.listener = l
	m.bootStarted = time.Now()
	m.mu.Unlock()
	go m.acceptLoop(l)
	go m.watch(inst)

	defer close(m.startReturned)
	start := inst.Start
	if m.restorePath != "" {
		start = func() error {
			if err := inst.RestoreState(m.restorePath); err != nil {
				return fmt.Errorf("restore %s: %w", m.restorePath, err)
			}
			return inst.Resume()
		}
	}
	if err := callCtx(ctx, start); err != nil {
		err = fmt.Errorf("vm %s: start: %w: %w", m.cfg.ID, errdefs.ErrUnavailable, err)
		m.finish(fmt.Errorf("%w; %s", err, describeTail("console", m.ConsoleTail(vzConsoleTailBytes))))
		// A Start that outlived ctx may still bring the VM up.
		m.hardStop("start failed")
		return err
	}
	return nil
}

// acceptLoop hands guest connections to AgentConn. It ends with the VM;
// a connection nobody takes (the guest redialled) is closed then. vz's
// Accept cannot be interrupted, so one blocked Accept may outlive the VM
// by as long as the framework keeps the listener's handler.
func (m *vzMachine) acceptLoop(l vzListener) {
	for {
		c, err := l.Accept()
		if err != nil || c == nil {
			select {
			case <-m.done:
				return
			case <-time.After(10 * time.Millisecond):
				continue
			}
		}
		select {
		case m.conns <- c:
		case <-m.done:
			c.Close()
			return
		}
	}
}

// watch is the one reader of the state changes: it reports the VM's exit.
// A stopped state counts only after the VM was seen starting or running,
// so a stale initial notification cannot end a VM that has not booted.
func (m *vzMachine) watch(inst vzInstance) {
	seenRunning := false
	for {
		var st vzState
		select {
		case st = <-inst.StateChanges():
		case <-m.done:
			return
		}
		switch st {
		case vzStarting, vzRunning, vzPaused, vzPausing, vzResuming, vzStopping, vzSaving, vzRestoring:
			seenRunning = true
			continue
		case vzError:
		case vzStopped:
			if !seenRunning {
				continue
			}
		default:
			continue
		}
		// A final state: let a failing Start record its own error first.
		select {
		case <-m.startReturned:
		case <-m.done:
		}
		m.finish(m.exitError(st))
		return
	}
}

// exitError decides Err for a VM that reached state st. The framework
// reports a guest power-off, a reboot and a panic (panic=-1 reboots, which
// ends a VM here) all as "stopped"; the console tells a panic apart.
func (m *vzMachine) exitError(st vzState) error {
	m.mu.Lock()
	stopping := m.stopping
	m.mu.Unlock()
	tail := m.ConsoleTail(vzConsoleTailBytes)
	switch {
	case stopping != "":
		return fmt.Errorf("vm %s: stopped by the host (%s): %w", m.cfg.ID, stopping, errdefs.ErrAborted)
	case st == vzError:
		return fmt.Errorf("vm %s: the framework stopped the VM with an error: %w; %s", m.cfg.ID, errdefs.ErrUnavailable,
			describeTail("console", tail))
	case strings.Contains(tail, "Kernel panic"):
		return fmt.Errorf("vm %s: guest kernel panicked: %w; %s", m.cfg.ID, errdefs.ErrUnavailable, describeTail("console", tail))
	}
	return nil
}

// hardStop pulls the plug, bounded in time, and records why.
func (m *vzMachine) hardStop(why string) {
	m.mu.Lock()
	inst := m.inst
	if m.stopping == "" {
		m.stopping = why
	}
	m.mu.Unlock()
	if inst == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), vzStopTimeout)
	defer cancel()
	_ = callCtx(ctx, inst.Stop)
}

// StartMode is StartTemplate for a VM restored from a template.
func (m *vzMachine) StartMode() StartMode {
	if m.restorePath != "" {
		return StartTemplate
	}
	return StartCold
}

// AgentConn waits until the guest agent has dialled the host's vsock
// port, bounded by ctx. It returns the same connection for the VM's life.
func (m *vzMachine) AgentConn(ctx context.Context) (net.Conn, error) {
	m.mu.Lock()
	started, agent := m.inst != nil, m.agent
	if agent != nil {
		m.agentGiven = true
	}
	m.mu.Unlock()
	if agent != nil {
		return agent, nil
	}
	if !started {
		return nil, fmt.Errorf("vm %s: not started: %w", m.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	take := func(c net.Conn) (net.Conn, error) {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.agent == nil {
			m.agent = c
		} else {
			// A concurrent AgentConn won; this is a second dial.
			c.Close()
		}
		m.agentGiven = true
		return m.agent, nil
	}
	select {
	case c := <-m.conns:
		return take(c)
	case <-m.done:
		return nil, fmt.Errorf("vm %s exited before the agent connected: %w", m.cfg.ID, m.Err())
	case <-ctx.Done():
		return nil, fmt.Errorf("vm %s: agent did not connect: %w; %s", m.cfg.ID, ctx.Err(),
			describeTail("console", m.ConsoleTail(vzConsoleTailBytes)))
	}
}

// Pause freezes the guest's CPUs.
func (m *vzMachine) Pause(ctx context.Context) error {
	return m.control(ctx, "pause", func(i vzInstance) func() error { return i.Pause })
}

// Resume lets a paused guest run again.
func (m *vzMachine) Resume(ctx context.Context) error {
	return m.control(ctx, "resume", func(i vzInstance) func() error { return i.Resume })
}

func (m *vzMachine) control(ctx context.Context, what string, op func(vzInstance) func() error) error {
	m.mu.Lock()
	inst := m.inst
	m.mu.Unlock()
	if inst == nil {
		return fmt.Errorf("vm %s: not started: %w", m.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	select {
	case <-m.done:
		return fmt.Errorf("vm %s: exited: %w", m.cfg.ID, errdefs.ErrFailedPrecondition)
	default:
	}
	if err := callCtx(ctx, op(inst)); err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("vm %s: %s: %w", m.cfg.ID, what, err)
		}
		// The framework refuses a transition the VM is not in a state
		// for (pausing a paused VM, ...).
		return fmt.Errorf("vm %s: %s: %w: %w", m.cfg.ID, what, errdefs.ErrFailedPrecondition, err)
	}
	return nil
}

// Stop asks the guest to shut down (the caller has normally asked the
// agent to power off already), waits for the VM to stop until ctx ends,
// then stops it hard. It returns once the VM is gone.
func (m *vzMachine) Stop(ctx context.Context) error {
	m.mu.Lock()
	inst := m.inst
	m.mu.Unlock()
	if inst != nil {
		select {
		case <-m.done:
		default:
			// Graceful first: harmless if the guest ignores it, and the
			// deadline below still holds.
			go inst.RequestStop()
			select {
			case <-m.done:
			case <-ctx.Done():
				m.hardStop("stop deadline passed")
			}
		}
		select {
		case <-m.done:
		case <-time.After(vzStopTimeout):
			// The framework never reported the stop: do not hang the
			// shim's teardown on it.
			m.finish(fmt.Errorf("vm %s: no stopped state %s after a hard stop: %w", m.cfg.ID, vzStopTimeout, errdefs.ErrAborted))
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.agentGiven && m.agent != nil {
		// Nobody took the channel, so nobody else will close it.
		m.agent.Close()
	}
	return nil
}

// Done is closed once the VM has exited.
func (m *vzMachine) Done() <-chan struct{} { return m.done }

// Err says why the VM exited: nil for a guest power-off, an error for a
// panic, a framework error, or a stop by the host. It is nil while the VM
// runs.
func (m *vzMachine) Err() error {
	select {
	case <-m.done:
	default:
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// ConsoleTail returns up to the last n bytes of the guest console (hvc0).
func (m *vzMachine) ConsoleTail(n int) string { return tailFile(m.plan.ConsolePath, n) }

// Pid is 0: the VM runs in the framework's XPC helper, whose pid the
// framework does not reveal.
func (m *vzMachine) Pid() int { return 0 }

// BootStarted is when Start asked the framework to boot the VM.
func (m *vzMachine) BootStarted() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bootStarted
}

// callCtx runs a blocking framework call, giving up when ctx ends. The
// call itself cannot be cancelled; its result is then dropped.
func callCtx(ctx context.Context, f func() error) error {
	res := make(chan error, 1)
	go func() { res <- f() }()
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
