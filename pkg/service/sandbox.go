package service

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/vm"
)

// sandbox is the pod's VM: one per shim. It owns the machine, the agent
// connection, the VM's state directory and the one share every container
// of the pod reaches its files through. Containers (container.go) run in
// it and come and go; the sandbox lives until the last one is deleted.
//
// The boot sequence (boot) is a list of small steps other features plug
// into: vmConfig builds the vm.Config (NICs, disks), the backend starts the
// machine, connect waits for the agent, and guestSetup runs the RPCs every
// fresh guest needs before containers are created.
type sandbox struct {
	// id is the container whose create booted the VM (the pod's sandbox
	// container, or a standalone container): it names the VM in logs.
	id        string
	namespace string
	cfg       *Config
	events    *eventQueue
	// stateDir holds the VM's sockets, console log and the share's host
	// directory; it is per VM, outside any bundle, since the first
	// container's bundle goes away while its siblings still run.
	stateDir string
	share    *podShare
	// network is what the VM is connected to (network.go): set by boot,
	// released by destroy.
	network *podNetwork
	// disks are the VM's disks (block-image root filesystems, attached at
	// boot only: see attachBlockRootfs); set before boot, read-only after.
	disks []vm.Disk

	// Set by boot before ready is closed, read-only afterwards.
	machine vm.Machine
	client  agentClient
	// reseeded is set by boot when a clone's Reseed already ran as its
	// proof of life (cloneAnswers), before the setup steps start.
	reseeded bool
	// vmCtx ends when the VM or the agent connection is gone (or the
	// sandbox is torn down): every call into the guest uses it, so the
	// loss of the VM fails them all at once.
	vmCtx    context.Context
	vmCancel context.CancelFunc
	// tearingDown is closed when the shim shuts the VM down on purpose, so
	// the watchdog does not report it as a crash.
	tearingDown chan struct{}
	// ready is closed once boot finished (by finishBoot); bootErr then
	// says how.
	ready    chan struct{}
	bootErr  error
	bootOnce sync.Once
	// streamSeq numbers stdio streams: names must be unique on the VM's
	// channel, across containers and reused exec IDs.
	streamSeq atomic.Uint64
}

// newSandbox prepares (but does not boot) the VM of a pod; base is the
// directory under which VM state directories are made (see vmStateDir).
func newSandbox(parent context.Context, id, namespace, bundle, base string, cfg *Config, events *eventQueue, mnt hostMounter) *sandbox {
	vmCtx, vmCancel := context.WithCancel(context.WithoutCancel(parent))
	stateDir := vmStateDir(base, namespace, id, bundle)
	return &sandbox{
		id:          id,
		namespace:   namespace,
		cfg:         cfg,
		events:      events,
		stateDir:    stateDir,
		share:       newPodShare(filepath.Join(stateDir, "shared"), mnt),
		vmCtx:       log.WithLogger(vmCtx, log.G(parent).WithField("sandbox_id", id)),
		vmCancel:    vmCancel,
		tearingDown: make(chan struct{}),
		ready:       make(chan struct{}),
	}
}

// vmStateDir picks the VM's directory: base/<hash>, short enough for unix
// socket paths (108 bytes) whatever the IDs. The first container's bundle
// is in the hash: it is unique per containerd, and several containerds
// (with the same namespaces and IDs) may share a host.
func vmStateDir(base, namespace, id, bundle string) string {
	sum := sha256.Sum256([]byte(namespace + "/" + id + "/" + bundle))
	return filepath.Join(base, hex.EncodeToString(sum[:8]))
}

// defaultStateBase is where VM state directories go.
func defaultStateBase() string {
	if st, err := os.Stat("/run"); err == nil && st.IsDir() {
		return "/run/macvm"
	}
	return filepath.Join(os.TempDir(), "macvm")
}

// streamPrefix returns a fresh stream name prefix for one process's stdio.
func (sb *sandbox) streamPrefix(execID string) string {
	n := sb.streamSeq.Add(1)
	if execID == "" {
		return "init-" + strconv.FormatUint(n, 10)
	}
	return "exec-" + strconv.FormatUint(n, 10)
}

// wait blocks until the VM booted (or failed to) or ctx ends.
func (sb *sandbox) wait(ctx context.Context) error {
	select {
	case <-sb.ready:
		return sb.bootErr
	case <-ctx.Done():
		return fmt.Errorf("waiting for the pod VM to boot: %w", ctx.Err())
	}
}

// finishBoot records the outcome of the boot for the waiters; only the
// first call counts (a create that fails before booting calls it too, so
// nobody waits forever).
func (sb *sandbox) finishBoot(err error) {
	sb.bootOnce.Do(func() {
		if err == nil && sb.client == nil {
			err = fmt.Errorf("the pod VM was not booted: %w", errdefs.ErrUnavailable)
		}
		sb.bootErr = err
		close(sb.ready)
	})
}

// booted tells whether the VM booted successfully.
func (sb *sandbox) booted() bool {
	select {
	case <-sb.ready:
		return sb.bootErr == nil
	default:
		return false
	}
}

// alive tells whether the VM still runs and answers.
func (sb *sandbox) alive() bool { return sb.vmCtx.Err() == nil }

// boot runs the sandbox boot sequence once; spec is the first container's
// (the pod sandbox's) OCI spec, which sizes the VM. It returns once the
// agent answers, with the guest setup (setupSteps) under way: the caller
// creates its container in the VM meanwhile (no setup step is needed to
// create one, only to start it) and then waits for the setup with wait.
// Every waiter learns the outcome of boot and setup through ready/bootErr.
// On error the caller waits (wait) and tears down.
//
// early runs the first container's prestart/createRuntime hooks when they
// must fill the pod's network namespace before the VM boots (network.go).
func (sb *sandbox) boot(ctx context.Context, b backend, spec *specs.Spec, early func() error) (err error) {
	defer func() {
		if err != nil {
			sb.finishBoot(err)
		}
	}()
	if err := os.MkdirAll(sb.stateDir, 0o700); err != nil {
		return fmt.Errorf("vm state dir: %w", err)
	}
	done := timed(ctx, sb.id, "network")
	sb.network, err = setupNetwork(ctx, sb.id, sb.stateDir, spec, early)
	if err != nil {
		return err
	}
	done()
	done = timed(ctx, sb.id, "vm config")
	vcfg, err := sb.vmConfig(ctx, spec)
	if err != nil {
		return err
	}
	done()
	client, err := sb.startMachine(ctx, b, vcfg)
	clone := vcfg.Templates != nil && vm.StartModeOf(sb.machine) != vm.StartCold
	if err == nil && clone {
		// The handshake shows that the guest's transport runs, not that
		// its agent serves: a clone must also answer its first RPC.
		if err = sb.cloneAnswers(ctx, client); err != nil {
			client.Close()
		}
	}
	if err != nil && clone && ctx.Err() == nil {
		// A clone that came up but never answered: its template passed
		// the checks and is still wrong. Never a failed container for it.
		log.G(ctx).WithError(err).WithField("container_id", sb.id).Warn("warm start: the clone's agent did not answer; booting cold")
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), teardownTimeout)
		sb.machine.Stop(sctx)
		cancel()
		vcfg.Templates = nil
		// A pooled VM's NICs were adopted: the cold VM gets the pod
		// network's own.
		if err = sb.network.reclaim(); err == nil {
			client, err = sb.startMachine(ctx, b, vcfg)
		}
	}
	if err != nil {
		return err
	}
	sb.client = client
	m := sb.machine
	if dirs := vm.ShareDirsOf(m); len(dirs) == 1 {
		// A pooled VM serves a share directory of its own.
		sb.share.relocate(dirs[0])
	}
	log.G(ctx).WithField("container_id", sb.id).WithField("start_mode", string(vm.StartModeOf(m))).
		WithField("agent_ready", time.Since(m.BootStarted())).Info("VM ready")
	go sb.watchdog()
	go func() {
		if err := sb.guestSetup(ctx); err != nil {
			sb.finishBoot(err)
			return
		}
		go sb.watchEvents()
		go sb.syncClock()
		sb.finishBoot(nil)
	}()
	return nil
}

// startMachine creates and starts the VM of vcfg (sb.machine) and connects
// to its agent.
func (sb *sandbox) startMachine(ctx context.Context, b backend, vcfg vm.Config) (agentClient, error) {
	m, err := b.newMachine(vcfg)
	if err != nil {
		return nil, fmt.Errorf("configure VM: %w", err)
	}
	// The VM lives as long as the pod, not as long as this RPC.
	done := timed(ctx, sb.id, "machine start")
	if err := m.Start(context.WithoutCancel(ctx)); err != nil {
		return nil, fmt.Errorf("start VM: %w", err)
	}
	done()
	sb.machine = m
	// The bench splits the create by this line, by container_id.
	log.G(ctx).WithField("container_id", sb.id).WithField("vm_pid", m.Pid()).Debug("VM started")
	return sb.connect(ctx, b)
}

// vmConfig is step 1 of the boot: what the VM looks like. Its size comes
// from the pod's resources (podSizingSpec) or the first container's; its
// device layout depends on the pod's configuration only, never on a
// container: one share (the pod share), and the NICs and disks the pod
// needs.
func (sb *sandbox) vmConfig(ctx context.Context, spec *specs.Spec) (vm.Config, error) {
	sizing, err := podSizingSpec(spec)
	if err != nil {
		return vm.Config{}, err
	}
	cpus, mem, err := sb.cfg.vmSize(sizing)
	if err != nil {
		return vm.Config{}, err
	}
	shares, err := sb.share.vmShares()
	if err != nil {
		return vm.Config{}, err
	}
	vcfg := vm.Config{
		ID:         sb.id,
		StateDir:   sb.stateDir,
		Kernel:     sb.cfg.Kernel,
		Initrd:     sb.cfg.Initrd,
		KernelArgs: sb.cfg.KernelArgs,
		CPUs:       cpus,
		MemoryMiB:  mem,
		Shares:     shares,
		Disks:      sb.disks,
		Hypervisor: sb.cfg.Hypervisor,
		Templates:  sb.cfg.templates(ctx),
		NICs:       sb.network.nics(),
	}
	return vcfg, nil
}

// setupStep is one RPC sequence every fresh guest goes through after the
// agent answered and before any container is created.
type setupStep struct {
	name string
	run  func(ctx context.Context, sb *sandbox) error
}

// setupSteps lists the guest setup steps (entropy, clock, network, ...
// each feature adds its own). They are independent of each other and run
// at once: each is a round trip to a guest that is slow to answer under
// emulation, and they overlap the first container's creation too.
func (sb *sandbox) setupSteps() []setupStep {
	return []setupStep{
		{"reseed guest RNG", func(ctx context.Context, sb *sandbox) error {
			if sb.reseeded {
				return nil
			}
			return sb.reseed(ctx, sb.client, vm.StartModeOf(sb.machine))
		}},
		{"set guest clock", func(ctx context.Context, sb *sandbox) error {
			_, err := sb.client.SetTime(ctx, &agent.SetTimeRequest{Time: timestamppb.Now()})
			return err
		}},
		{"configure guest network", func(ctx context.Context, sb *sandbox) error {
			return sb.network.configure(ctx, sb.client, vm.StartModeOf(sb.machine))
		}},
	}
}

// guestSetup runs the setup steps, bounded by createTimeout: containerd's
// Create carries no deadline, so a guest that stops answering fails the
// create with its console instead of hanging it.
func (sb *sandbox) guestSetup(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, createTimeout)
	defer cancel()
	steps := sb.setupSteps()
	errs := make([]error, len(steps))
	var wg sync.WaitGroup
	for i, st := range steps {
		wg.Go(func() {
			done := timed(ctx, sb.id, st.name)
			if err := st.run(cctx, sb); err != nil {
				errs[i] = sb.guestError(st.name, err)
				return
			}
			done()
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// guestError describes a failed agent RPC of a create; a time-out says
// which bound it hit and carries the end of the guest console, where the
// agent's own errors (and its goroutine dump on SIGQUIT) show.
func (sb *sandbox) guestError(step string, err error) error {
	if !errdefs.IsDeadlineExceeded(err) && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w", step, err)
	}
	return fmt.Errorf("%s: the guest agent did not answer within %v: %w; console: %s",
		step, createTimeout, err, sb.machine.ConsoleTail(2048))
}

// connect waits for the agent of a booting VM, bounded by the boot timeout;
// on failure the error carries the end of the guest console, which is where
// a kernel panic or an agent crash shows.
func (sb *sandbox) connect(ctx context.Context, b backend) (agentClient, error) {
	timeout := sb.cfg.bootTimeout()
	// The handshake context must not end with this RPC (the client may tie
	// its session to it), only when the boot times out, the RPC is
	// cancelled or the VM exits during boot.
	hctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	timer := time.AfterFunc(timeout, cancel)
	stopOnRPC := context.AfterFunc(ctx, cancel)
	booting := make(chan struct{})
	// The machine is read here: a cold-boot retry replaces sb.machine
	// while this goroutine may still run.
	vmDone := sb.machine.Done()
	go func() {
		select {
		case <-vmDone:
			cancel()
		case <-booting:
		}
	}()
	ok := false
	defer func() {
		close(booting)
		stopOnRPC()
		timer.Stop()
		if !ok {
			cancel()
		}
	}()

	conn, err := sb.machine.AgentConn(hctx)
	if err == nil {
		var client agentClient
		client, err = b.dialAgent(hctx, conn, vm.StartModeOf(sb.machine) != vm.StartCold)
		if err == nil {
			ok = true
			return client, nil
		}
	}
	cause := err
	select {
	case <-sb.machine.Done():
		cause = fmt.Errorf("the VM exited during boot (%v): %w", sb.machine.Err(), errdefs.ErrUnavailable)
	default:
		if hctx.Err() != nil && ctx.Err() == nil {
			cause = fmt.Errorf("the guest agent did not answer within %v (boot_timeout): %w", timeout, context.DeadlineExceeded)
		}
	}
	return nil, fmt.Errorf("connect to guest agent: %w; console: %s", cause, sb.machine.ConsoleTail(2048))
}

// watchdog turns the loss of the VM or of the agent connection into the
// exit of every process of every container: vmCtx ends, every pending
// WaitProcess fails, and each waiter reports exit 137.
func (sb *sandbox) watchdog() {
	var why string
	select {
	case <-sb.machine.Done():
		why = fmt.Sprintf("VM exited: %v", sb.machine.Err())
	case <-sb.client.Done():
		why = "agent connection lost"
	case <-sb.tearingDown:
		return
	}
	select {
	case <-sb.tearingDown:
	default:
		log.G(sb.vmCtx).WithField("console", sb.machine.ConsoleTail(2048)).
			Error(why + ": every process is reported killed")
	}
	sb.vmCancel()
}

// clockSyncInterval is how often the guest clock is set from the host's.
const clockSyncInterval = time.Minute

// syncClock keeps the guest's wall clock on the host's: under emulation the
// guest clock drifts, and after the host sleeps it lags by the sleep.
func (sb *sandbox) syncClock() {
	t := time.NewTicker(clockSyncInterval)
	defer t.Stop()
	for {
		select {
		case <-sb.vmCtx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(sb.vmCtx, rpcTimeout)
		if _, err := sb.client.SetTime(ctx, &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil && sb.vmCtx.Err() == nil {
			log.G(ctx).WithError(err).Debug("sync guest clock")
		}
		cancel()
	}
}

// watchEvents long-polls the agent's events and forwards OOM kills, each
// to the container whose cgroup recorded it.
func (sb *sandbox) watchEvents() {
	for sb.vmCtx.Err() == nil {
		resp, err := sb.client.WaitEvents(sb.vmCtx, &agent.WaitEventsRequest{})
		if err != nil {
			if sb.vmCtx.Err() != nil || errdefs.IsNotImplemented(err) {
				return
			}
			log.G(sb.vmCtx).WithError(err).Debug("wait for guest events")
			select {
			case <-sb.vmCtx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		for _, e := range resp.GetEvents() {
			if oom := e.GetOom(); oom != nil && oom.GetContainerId() != "" {
				sb.events.send(&eventstypes.TaskOOM{ContainerID: oom.GetContainerId()})
			}
		}
	}
}

// stopVM stops the VM at once (a wedged guest): vmCtx then ends and every
// process of the pod is reported killed.
func (sb *sandbox) stopVM() {
	if sb.machine == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(sb.vmCtx), time.Second)
	defer cancel()
	_ = sb.machine.Stop(ctx)
}

// destroy stops the VM and releases the host resources: the agent is asked
// to power off cleanly (so shares are flushed), then the VM is stopped, the
// share's host mounts undone and the state directory removed. Each step is
// bounded and best-effort: a half-booted or crashed VM goes through it too.
// The containers must be torn down (container.destroy) first.
func (sb *sandbox) destroy(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	logger := log.G(ctx).WithField("sandbox_id", sb.id)
	select {
	case <-sb.tearingDown:
	default:
		close(sb.tearingDown)
	}
	// Without a guest that agreed to power off, waiting for the VM to exit
	// by itself is pointless: it is killed at once.
	poweringOff := false
	if sb.client != nil && sb.alive() {
		done := timed(ctx, sb.id, "guest shutdown")
		sctx, cancel := context.WithTimeout(ctx, teardownTimeout)
		_, err := sb.client.Shutdown(sctx, &emptypb.Empty{})
		done()
		if err != nil {
			logger.WithError(err).Debug("guest shutdown")
		}
		// A connection that closes under the call is a guest powering off.
		poweringOff = err == nil || errdefs.IsUnavailable(err)
		cancel()
	}
	if sb.machine != nil {
		wait := time.Duration(0)
		if poweringOff {
			wait = teardownTimeout
		}
		sctx, cancel := context.WithTimeout(ctx, wait)
		done := timed(ctx, sb.id, "VM exit")
		if err := sb.machine.Stop(sctx); err != nil {
			logger.WithError(err).Warn("stop VM")
		}
		done()
		cancel()
		logger.Debug("VM stopped")
	}
	if sb.client != nil {
		sb.client.Close()
	}
	sb.vmCancel()
	done := timed(ctx, sb.id, "host cleanup")
	defer done()
	if err := sb.network.close(); err != nil {
		logger.WithError(err).Warn("release pod network")
	}
	// The containers' poststop hooks (CNI DEL) have run: the namespace the
	// shim made for them can go.
	if err := sb.network.removeOwn(); err != nil {
		logger.WithError(err).Warn("remove pod network namespace")
	}
	if err := sb.share.removeAll(); err != nil {
		// The state dir holds mount points: never remove it recursively
		// while something may still be mounted there.
		logger.WithError(err).Warn("pod share: host mounts left, state dir kept")
		return
	}
	if err := os.RemoveAll(sb.stateDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		logger.WithError(err).Warn("remove VM state dir")
	}
}
