package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// PoolDaemon keeps VMs started ahead for the shims of one template cache:
// per template key, Size clones restored from the template and left
// paused, each with a state and share directory of its own (QEMU opens a
// 9p share's root when it starts, so the share cannot be chosen later).
// A shim takes one over the socket and receives its QMP and agent sockets
// and a pidfd; the daemon refills in the background, reaps the VMs it
// handed out when their lease (the shim's connection) ends, drops a key's
// pool when nobody asked for it for its idle time, and exits when it has
// neither pools nor leases.
//
// Pooled qemus do not die with the daemon: a VM handed out runs a shim's
// containers, which a crashed or killed daemon must not take along. Each
// VM's directory records its qemu and owner instead (pool_owner_linux.go),
// and the next daemon (or StopPool) kills what nobody holds and adopts the
// leases whose shims still run. A daemon stopped with SIGTERM (Run's ctx)
// kills its ready VMs and waits for its leases to end.
type PoolDaemon struct {
	// Dir is the daemon's directory (socket, pidfile, lock, VM dirs).
	Dir string
	// Templates is the cache the pooled VMs are clones from.
	Templates *TemplateCache
	// Logf reports what the daemon does; nil is silent.
	Logf func(format string, args ...any)
	// Warm, when set, runs each pooled VM briefly after its restore and
	// is called with a connection to its agent and the tags of its shares
	// (guest.PoolWarm: a session, an Info call, the shares mounted), then
	// the VM is paused again. A new QEMU process starts with an empty TCG
	// translation cache, so without it the shim's first RPCs pay for
	// translating the agent's code; and what is per VM rather than per
	// container (the pod share's mount) is done while nobody waits. The
	// shim's handshake later replaces this session (transport resync).
	Warm PoolWarmFunc

	mu sync.Mutex // guards everything below
	// keys are the pools, by template key.
	keys map[string]*poolKey
	// leases counts VMs handed out whose shim still holds them, its own
	// and those it adopted from a previous daemon.
	leases int
	// adopted counts, by template key, the leases adopted from a
	// previous daemon (for PoolStatus).
	adopted map[string]int
	// known is the VM directories this daemon starts, holds or has
	// handed out; the sweep (sweepOrphans) leaves them alone.
	known map[string]bool
	// boot is the kernel's boot id, written into the VMs' records.
	boot string
	// wake wakes the janitor early (a pool set to size 0, a lease ended).
	wake chan struct{}
	// fill wakes the filler.
	fill chan struct{}
	// closing is set once Run is shutting down: no new VMs.
	closing bool
}

// poolKey is one template key's pool.
type poolKey struct {
	key      string
	cfg      Config
	size     int
	idle     time.Duration
	ready    []*pooledVM
	starting int
	leased   int
	lastUsed time.Time
	// handedOver is when a VM of the key last went to a shim: the refill
	// waits poolRefillDelay after it.
	handedOver time.Time
	// failures counts VM starts that failed in a row; at maxPoolFailures
	// the filler leaves the key alone until the next request.
	failures int
}

// maxPoolFailures stops refilling a key whose VMs do not start (a broken
// template: the shims' own clone start then rebuilds it).
const maxPoolFailures = 3

// poolRefillDelay is how long the filler leaves a key alone after a
// hand-over: a restore and warm-up take CPU that the container just
// handed a VM is starting in (measured on the 2-core TCG machine: the
// guest's create took 0.93 s instead of 0.72 s with an immediate refill).
// A burst of starts empties the pool, which refills after it.
const poolRefillDelay = 2 * time.Second

// poolVMStartTimeout bounds one pooled VM's start and restore.
const poolVMStartTimeout = 2 * time.Minute

// pooledVM is a qemu started ahead, restored and paused.
type pooledVM struct {
	id     string
	dir    string
	shares []string
	cmd    *exec.Cmd
	// qmp and agent are the host ends of its sockets, handed over as is;
	// pidfd was opened right after the start (before any reaping could
	// free the pid).
	qmp, agent, pidfd *os.File
	// nics are its NICs' stand-ins (nil without NICs): handed over with
	// it, closed when it is discarded.
	nics    *standIns
	done    chan struct{} // closed once reaped
	readyAt time.Time
	// rec is its record (the daemon as owner), written into dir.
	rec poolRecord
}

func (d *PoolDaemon) logf(format string, args ...any) {
	if d.Logf != nil {
		d.Logf(format, args...)
	}
}

// Run serves until ctx ends or the daemon has been idle: no pool left
// and no lease. first, when set, is the request of the shim that started
// the daemon (its key's pool starts filling at once). It returns an
// error wrapping errdefs.ErrAlreadyExists when another daemon holds Dir.
func (d *PoolDaemon) Run(ctx context.Context, first *poolRequest) error {
	if err := os.MkdirAll(d.Dir, 0o700); err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	lock, err := os.OpenFile(PoolLockFile(d.Dir), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("pool lock: %w", err)
	}
	defer lock.Close()
	if err := flockNB(lock); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("pool daemon of %s already runs: %w", d.Dir, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("pool lock: %w", err)
	}
	d.keys = map[string]*poolKey{}
	d.adopted = map[string]int{}
	d.known = map[string]bool{}
	d.wake = make(chan struct{}, 1)
	d.fill = make(chan struct{}, 1)
	if d.boot, err = bootID(); err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	// What a previous daemon left: kill the VMs nobody holds, adopt the
	// ones handed out, before this one starts VMs of its own.
	d.sweep()
	os.Remove(PoolSocket(d.Dir))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: PoolSocket(d.Dir), Net: "unix"})
	if err != nil {
		return fmt.Errorf("pool: %w", err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.WriteFile(PoolPidFile(d.Dir), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		l.Close()
		return fmt.Errorf("pool pidfile: %w", err)
	}
	d.logf("pool daemon %d serving %s", os.Getpid(), PoolSocket(d.Dir))
	if first != nil {
		if _, err := d.register(first); err != nil {
			d.logf("pool: the first request cannot be pooled: %v", err)
		}
	}

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); d.filler(runCtx) }()
	go func() { defer wg.Done(); d.janitor(runCtx, stop) }()
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			go d.serve(c)
		}
	}()
	<-runCtx.Done()

	// Shut down: no new requests, the ready VMs go, leased ones stay
	// until their shims are done with them.
	os.Remove(PoolSocket(d.Dir))
	l.Close()
	d.mu.Lock()
	d.closing = true
	var drop []*pooledVM
	for _, k := range d.keys {
		drop = append(drop, k.ready...)
		k.ready = nil
	}
	d.mu.Unlock()
	for _, v := range drop {
		d.discard(v)
	}
	wg.Wait()
	for {
		d.mu.Lock()
		n, starting := d.leases, 0
		for _, k := range d.keys {
			starting += k.starting
		}
		d.mu.Unlock()
		if n == 0 && starting == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	os.Remove(PoolPidFile(d.Dir))
	d.logf("pool daemon %d exits", os.Getpid())
	return nil
}

// register makes (or updates) req's key's pool and returns it; an error
// when the request cannot be pooled (too many NICs).
func (d *PoolDaemon) register(req *poolRequest) (*poolKey, error) {
	key, err := poolKeyOf(req.Config)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	k := d.keys[key]
	if k == nil {
		k = &poolKey{key: key}
		d.keys[key] = k
	}
	k.cfg = req.Config
	k.cfg.Templates = nil
	k.size = req.Size
	k.idle = time.Duration(req.IdleMs) * time.Millisecond
	if k.idle <= 0 {
		k.idle = DefaultPoolIdleTimeout
	}
	k.lastUsed = time.Now()
	k.failures = 0
	d.kick(d.fill)
	if k.size == 0 {
		d.kick(d.wake)
	}
	return k, nil
}

// poolKeyOf is cfg's template key. A request's NICs carry no files (the
// key counts them by kind only, as it counts disks by number and
// read-only flag): a placeholder stands in for the check NewQEMU makes.
func poolKeyOf(cfg Config) (string, error) {
	if len(cfg.NICs) > maxPoolNICs {
		return "", fmt.Errorf("vm %s has %d NICs, pooled VMs at most %d: %w", cfg.ID, len(cfg.NICs), maxPoolNICs, errdefs.ErrNotImplemented)
	}
	if len(cfg.NICs) > 0 {
		placeholder, err := os.Open(os.DevNull)
		if err != nil {
			return "", err
		}
		defer placeholder.Close()
		nics := make([]NIC, len(cfg.NICs))
		for i, n := range cfg.NICs {
			nics[i] = NIC{Kind: n.Kind, MAC: n.MAC, File: placeholder}
		}
		cfg.NICs = nics
	}
	probe, err := NewQEMU(cfg)
	if err != nil {
		return "", err
	}
	in, err := probe.templateInputs()
	if err != nil {
		return "", err
	}
	key, _, err := in.key()
	return key, err
}

func (d *PoolDaemon) kick(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// serve answers one connection: a status, or a take whose connection then
// stays open as the lease of the VM handed over.
func (d *PoolDaemon) serve(c *net.UnixConn) {
	defer c.Close()
	var req poolRequest
	files, err := readPoolMessage(c, &req, 0, time.Now().Add(DefaultPoolTimeout))
	if err != nil {
		writePoolMessage(c, &poolReply{Error: err.Error()})
		return
	}
	for _, f := range files {
		f.Close()
	}
	switch req.Op {
	case poolOpStatus:
		writePoolMessage(c, &poolReply{Status: d.status()})
		return
	case poolOpTake:
	default:
		writePoolMessage(c, &poolReply{Error: fmt.Sprintf("unknown request %q", req.Op)})
		return
	}
	// The VM's owner is written down before it is handed over, so a
	// daemon that dies at any point never leaves a VM in use recorded
	// as nobody's.
	owner, ownerStart, err := peerOwner(c)
	if err != nil {
		writePoolMessage(c, &poolReply{Error: err.Error()})
		return
	}
	k, err := d.register(&req)
	if err != nil {
		writePoolMessage(c, &poolReply{Error: err.Error()})
		return
	}
	v := d.pop(k)
	if v == nil {
		why := "no VM ready"
		if req.Size == 0 {
			why = "pool_size is 0"
		}
		writePoolMessage(c, &poolReply{Empty: true, Error: why})
		return
	}
	rep := poolReply{Key: k.key, Pid: v.cmd.Process.Pid, Dir: v.dir, Shares: v.shares,
		ReadyMs: time.Since(v.readyAt).Milliseconds()}
	handed := []*os.File{v.qmp, v.agent, v.pidfd}
	if v.nics != nil {
		meta, files := v.nics.handOver()
		rep.NICs = meta
		handed = append(handed, files...)
	}
	rec := v.rec
	rec.Owner, rec.OwnerStart = owner, ownerStart
	err = writePoolRecord(v.dir, rec)
	if err == nil {
		err = writePoolMessage(c, &rep, handed...)
	} else {
		writePoolMessage(c, &poolReply{Error: err.Error()})
	}
	// The shim has its own copies now (or none, and the VM goes).
	v.qmp.Close()
	v.agent.Close()
	v.pidfd.Close()
	if v.nics != nil {
		v.nics.close()
	}
	if err != nil {
		d.logf("pool: handing over vm %s: %v", v.id, err)
	} else {
		d.logf("pool: vm %s (pid %d) handed over for template %s after %v ready", v.id, rep.Pid, k.key, time.Duration(rep.ReadyMs)*time.Millisecond)
		// The lease: the shim closes the connection when its VM has
		// exited (or when it dies).
		_, _ = io.Copy(io.Discard, c)
	}
	d.discard(v)
	d.mu.Lock()
	k.leased--
	d.leases--
	d.mu.Unlock()
	d.kick(d.wake)
}

// pop takes the oldest ready VM of k that still runs, and counts its lease.
func (d *PoolDaemon) pop(k *poolKey) *pooledVM {
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(k.ready) > 0 {
		v := k.ready[0]
		k.ready = k.ready[1:]
		select {
		case <-v.done:
			go d.discard(v) // exited while waiting
			continue
		default:
		}
		k.leased++
		d.leases++
		k.handedOver = time.Now()
		return v
	}
	return nil
}

func (d *PoolDaemon) status() map[string]PoolKeyStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := map[string]PoolKeyStatus{}
	for key, k := range d.keys {
		st[key] = PoolKeyStatus{Ready: len(k.ready), Leased: k.leased, Size: k.size}
	}
	for key, n := range d.adopted {
		s := st[key]
		s.Leased += n
		st[key] = s
	}
	return st
}

// filler starts VMs, one at a time (each restore costs CPU the shims
// want), until every pool has its size; a pool that just handed a VM out
// waits poolRefillDelay.
func (d *PoolDaemon) filler(ctx context.Context) {
	for {
		k := d.next()
		if k == nil {
			select {
			case <-ctx.Done():
				return
			case <-d.fill:
			case <-time.After(poolRefillDelay / 4):
			}
			continue
		}
		d.mu.Lock()
		cfg := k.cfg
		d.mu.Unlock()
		v, err := d.start(ctx, k.key, cfg)
		d.mu.Lock()
		k.starting--
		if err != nil {
			k.failures++
			d.mu.Unlock()
			if ctx.Err() == nil {
				d.logf("pool: starting a VM of template %s (failure %d): %v", k.key, k.failures, err)
			}
			continue
		}
		k.failures = 0
		if d.closing || d.keys[k.key] != k || len(k.ready) >= k.size {
			d.mu.Unlock()
			d.discard(v)
			continue
		}
		k.ready = append(k.ready, v)
		d.mu.Unlock()
		d.logf("pool: vm %s (pid %d) ready for template %s", v.id, v.cmd.Process.Pid, k.key)
	}
}

// next picks a pool short of VMs and counts the start; nil if none.
func (d *PoolDaemon) next() *poolKey {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return nil
	}
	for _, k := range d.keys {
		if k.failures < maxPoolFailures && len(k.ready)+k.starting < k.size && time.Since(k.lastUsed) < k.idle &&
			time.Since(k.handedOver) >= poolRefillDelay {
			k.starting++
			return k
		}
	}
	return nil
}

// janitor drops pools idle for longer than their idle time (or sized 0)
// and the ready VMs of a template that is no longer valid, and ends the
// daemon (stop) once there are neither pools nor leases.
func (d *PoolDaemon) janitor(ctx context.Context, stop func()) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	lastSweep := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.wake:
		}
		if time.Since(lastSweep) >= poolSweepInterval {
			d.sweep()
			lastSweep = time.Now()
		}
		// A pool whose template is gone or changed (damaged, rebuilt,
		// pruned) serves nobody: its VMs would be clones of a template
		// the shims no longer use.
		d.mu.Lock()
		keys := make([]string, 0, len(d.keys))
		for key := range d.keys {
			keys = append(keys, key)
		}
		d.mu.Unlock()
		stale := map[string]bool{}
		for _, key := range keys {
			if _, err := d.Templates.validate(key); err != nil {
				stale[key] = true
			}
		}
		var drop []*pooledVM
		d.mu.Lock()
		for key, k := range d.keys {
			if k.size > 0 && time.Since(k.lastUsed) < k.idle && (!stale[key] || len(k.ready) == 0) {
				continue
			}
			drop = append(drop, k.ready...)
			k.ready = nil
			if k.leased == 0 && k.starting == 0 {
				delete(d.keys, key)
				d.logf("pool: template %s: pool dropped (size %d, unused for %v, template gone or changed: %v)", key, k.size, time.Since(k.lastUsed).Round(time.Second), stale[key])
			}
		}
		done := len(d.keys) == 0 && d.leases == 0
		d.mu.Unlock()
		for _, v := range drop {
			d.discard(v)
		}
		if done {
			stop()
			return
		}
	}
}

// start launches a clone of key's template with a directory of its own,
// restores it over a monitor of the daemon's (the VM's own QMP socket is
// left untouched for the shim, greeting and all) and leaves it paused.
func (d *PoolDaemon) start(ctx context.Context, key string, cfg Config) (_ *pooledVM, retErr error) {
	tc := d.Templates
	if _, err := tc.validate(key); err != nil {
		return nil, err
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	v := &pooledVM{id: hex.EncodeToString(rnd[:]), done: make(chan struct{})}
	v.dir = filepath.Join(d.Dir, "vm-"+v.id)
	d.setKnown(v.dir, true)
	if err := os.Mkdir(v.dir, 0o711); err != nil {
		d.setKnown(v.dir, false)
		return nil, fmt.Errorf("pool: %w", err)
	}
	var cleanup []io.Closer
	defer func() {
		for _, c := range cleanup {
			c.Close()
		}
		if retErr != nil {
			if v.cmd != nil {
				v.cmd.Process.Kill()
				<-v.done
			}
			for _, f := range []*os.File{v.qmp, v.agent, v.pidfd} {
				if f != nil {
					f.Close()
				}
			}
			if v.nics != nil {
				v.nics.close()
			}
			os.RemoveAll(v.dir)
			d.setKnown(v.dir, false)
		}
	}()
	pcfg := cfg
	pcfg.ID = "pool-" + v.id
	pcfg.StateDir = v.dir
	pcfg.Templates = nil
	pcfg.Shares = make([]Share, len(cfg.Shares))
	for i, s := range cfg.Shares {
		s.HostPath = filepath.Join(v.dir, "share"+strconv.Itoa(i))
		if err := os.Mkdir(s.HostPath, 0o711); err != nil {
			return nil, fmt.Errorf("pool: %w", err)
		}
		pcfg.Shares[i] = s
		v.shares = append(v.shares, s.HostPath)
	}
	pcfg.Disks = make([]Disk, len(cfg.Disks))
	for i, dk := range cfg.Disks {
		// Empty stand-ins like the template's: the shim that takes the
		// VM swaps each for its container's image (swapPooledDisks).
		dk.Path = filepath.Join(v.dir, "disk"+strconv.Itoa(i))
		if err := os.WriteFile(dk.Path, nil, 0o600); err != nil {
			return nil, fmt.Errorf("pool: %w", err)
		}
		pcfg.Disks[i] = dk
	}
	if len(cfg.NICs) > 0 {
		// Stand-ins like the template's (standInNICs): the shim that
		// takes the VM adopts them (NIC.Adopt).
		nics, err := newStandIns(cfg.NICs)
		if err != nil {
			return nil, fmt.Errorf("pool: %w", err)
		}
		v.nics = nics
		pcfg.NICs = v.nics.nics
	}
	q, err := NewQEMU(pcfg)
	if err != nil {
		return nil, err
	}
	q.memPath = filepath.Join(tc.dir(key), templateMemory)
	q.statePath = filepath.Join(tc.dir(key), templateState)
	args, err := q.args()
	if err != nil {
		return nil, err
	}
	args = append(args,
		"-chardev", fmt.Sprintf("socket,%s,fd=%d", poolMonArg, poolMonFD(len(pcfg.NICs))),
		"-mon", "chardev=poolmon,mode=control")

	qmpHost, qmpChild, err := filePair()
	if err != nil {
		return nil, err
	}
	cleanup = append(cleanup, qmpChild)
	v.qmp = qmpHost
	agentHost, agentChild, err := filePair()
	if err != nil {
		return nil, err
	}
	cleanup = append(cleanup, agentChild)
	v.agent = agentHost
	monHost, monChild, err := socketpair()
	if err != nil {
		return nil, err
	}
	cleanup = append(cleanup, monChild, monHost)
	state, err := os.Open(q.statePath)
	if err != nil {
		return nil, fmt.Errorf("pool: template state: %w", err)
	}
	cleanup = append(cleanup, state)
	logf, err := os.OpenFile(q.logPath(), os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cleanup = append(cleanup, logf)

	cmd := exec.Command(q.binary, args...)
	cmd.Dir = v.dir
	cmd.Env = qemuEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{qmpChild, agentChild, state} // fds 3-5
	for _, n := range pcfg.NICs {
		cmd.ExtraFiles = append(cmd.ExtraFiles, n.File) // nicFDs
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, monChild)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// No parent-death signal: a VM handed out outlives the daemon
		// (see PoolDaemon); its record says who must end it.
		Setpgid: true,
	}
	noHugePages()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("pool: starting %s: %w", q.binary, err)
	}
	pidfd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("pool: pidfd: %w", err)
	}
	v.pidfd = os.NewFile(uintptr(pidfd), "qemu-pidfd")
	if v.nics != nil {
		v.nics.dropQEMUEnds()
	}
	// Not reaped yet (nobody waited), so the pid is still this qemu's.
	qstart, err := procStart(cmd.Process.Pid)
	if err == nil {
		v.rec = poolRecord{Key: key, BootID: d.boot, Pid: cmd.Process.Pid, Start: qstart}
		err = writePoolRecord(v.dir, v.rec)
	}
	v.cmd = cmd
	go func() {
		cmd.Wait()
		close(v.done)
	}()
	if err != nil {
		return nil, fmt.Errorf("pool: vm %s: %w", v.id, err)
	}

	// Filling the pool is background work: the restore and warm-up run
	// at the lowest CPU priority, so they yield to the VMs in use (on a
	// small TCG host they otherwise slow the container just handed a VM).
	renice(cmd.Process.Pid, poolNice)
	sctx, cancel := context.WithTimeout(ctx, poolVMStartTimeout)
	defer cancel()
	mon := newQMP(monHost, nil)
	err = mon.handshake(sctx)
	renice(cmd.Process.Pid, poolNice) // threads QEMU made meanwhile
	if err == nil {
		err = restoreState(sctx, mon)
	}
	if err == nil && d.Warm != nil {
		tags := make([]string, len(pcfg.Shares))
		for i, sh := range pcfg.Shares {
			tags[i] = sh.Tag
		}
		err = d.warm(sctx, mon, v, tags)
	}
	// Handed over, it is a container's VM like any other.
	renice(cmd.Process.Pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pool: restoring vm %s: %w; %s", v.id, err,
			describeTail("qemu log", tailFile(q.logPath(), consoleTailBytes)))
	}
	v.readyAt = time.Now()
	return v, nil
}

// warm runs the restored VM v until Warm returns, then pauses it again.
func (d *PoolDaemon) warm(ctx context.Context, mon *qmpClient, v *pooledVM, shareTags []string) error {
	conn, err := net.FileConn(v.agent) // a dup: v.agent stays for the shim
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := mon.execute(ctx, "cont", nil); err != nil {
		return err
	}
	release, err := d.Warm(ctx, conn, shareTags)
	if err != nil {
		return fmt.Errorf("warming up: %w", err)
	}
	if release != nil {
		release()
	}
	_, err = mon.execute(ctx, "stop", nil)
	return err
}

// poolNice is the nice value of a pooled qemu until it is ready: a tenth
// of a nice-0 process's CPU share when they compete (nice 19 would be
// 1.5%, and at a load of 6 on 2 cores a refill would take minutes).
const poolNice = 10

// renice sets the nice value of every thread of pid (nice is per thread
// on Linux; threads inherit their creator's).
func renice(pid, nice int) {
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return
	}
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			_ = unix.Setpriority(unix.PRIO_PROCESS, tid, nice)
		}
	}
}

// poolMonFD is the daemon's own monitor in a pooled qemu with nics NICs:
// after the template state's and the NICs' fds.
func poolMonFD(nics int) int { return childStateFD + 1 + nics }

// poolMonArg names that monitor's chardev on qemu's command line: with
// the VM's directory, it is how a pooled qemu is recognised there
// (pool_owner_linux.go).
const poolMonArg = "id=poolmon"

// filePair is a socketpair as two files (both ends are passed on).
func filePair() (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "vm-host"), os.NewFile(uintptr(fds[1]), "vm-child"), nil
}

// discard kills v (if it still runs), waits for its reaping and removes
// its directory once nothing is mounted below it any more: the shim
// unmounts its containers' files from the share after its VM exited, and
// a dead shim's are undone by containerd's cleanup of its containers.
func (d *PoolDaemon) discard(v *pooledVM) {
	if v.cmd != nil {
		select {
		case <-v.done:
		default:
			v.cmd.Process.Kill()
		}
		<-v.done
	}
	for _, f := range []*os.File{v.qmp, v.agent, v.pidfd} {
		f.Close() // no-op when already closed
	}
	if v.nics != nil {
		v.nics.close()
	}
	// A directory still mounted after the wait is the sweep's to remove.
	removeUnmounted(v.dir, time.Minute, d.logf)
	d.setKnown(v.dir, false)
}

// setKnown adds dir to the directories the sweep leaves alone, or
// removes it.
func (d *PoolDaemon) setKnown(dir string, on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if on {
		d.known[dir] = true
	} else {
		delete(d.known, dir)
	}
}

// sweep deals with the VM directories this daemon does not know
// (sweepOrphans): a previous daemon's VMs that nobody holds are killed,
// its leases whose shims still run adopted.
func (d *PoolDaemon) sweep() {
	known := func(dir string) bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.known[dir]
	}
	sweepOrphans(d.Dir, known, d.adopt, d.logf)
}

// adopt takes over the lease of a VM a previous daemon handed out and
// whose shim still runs: the shim keeps using it; when the shim exits
// (without containerd's cleanup, which kills it too) the qemu is killed,
// and once it has exited its directory is removed. Until then it counts
// as a lease (the daemon does not exit idle, and PoolStatus shows it).
func (d *PoolDaemon) adopt(o orphan) {
	d.mu.Lock()
	d.known[o.dir] = true
	d.leases++
	d.adopted[o.rec.Key]++
	d.mu.Unlock()
	d.logf("pool: %s: its qemu (pid %d) runs for shim %d, handed out by a previous daemon: lease adopted", o.dir, o.rec.Pid, o.rec.Owner)
	go func() {
		defer o.close()
		fds := []unix.PollFd{{Fd: int32(o.qemu.Fd()), Events: unix.POLLIN}, {Fd: int32(o.owner.Fd()), Events: unix.POLLIN}}
		for {
			fds[0].Revents, fds[1].Revents = 0, 0
			n, err := unix.Poll(fds, -1)
			if err != nil && !errors.Is(err, unix.EINTR) {
				// Never a reason to kill a VM in use: look again.
				d.logf("pool: %s: watching the adopted VM: %v", o.dir, err)
				time.Sleep(time.Second)
				continue
			}
			if n > 0 {
				break
			}
		}
		if fds[0].Revents == 0 {
			d.logf("pool: %s: shim %d exited: killing its qemu (pid %d)", o.dir, o.rec.Owner, o.rec.Pid)
			killPidfd(o.qemu, 10*time.Second)
		}
		for !pidfdExited(o.qemu, time.Minute) {
		}
		removeUnmounted(o.dir, time.Minute, d.logf)
		d.mu.Lock()
		delete(d.known, o.dir)
		d.leases--
		if d.adopted[o.rec.Key]--; d.adopted[o.rec.Key] <= 0 {
			delete(d.adopted, o.rec.Key)
		}
		d.mu.Unlock()
		d.kick(d.wake)
	}()
}

// removeUnmounted removes dir once no mount is below it, waiting up to
// wait; it never unmounts anything (what is mounted there is a shim's).
func removeUnmounted(dir string, wait time.Duration, logf func(string, ...any)) {
	deadline := time.Now().Add(wait)
	for {
		removed, err := removeIfUnmounted(dir)
		if err != nil {
			logf("pool: removing %s: %v", dir, err)
			return
		}
		if removed {
			return
		}
		if time.Now().After(deadline) {
			logf("pool: leaving %s for now: still mounted below it", dir)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// removeIfUnmounted removes dir if nothing is mounted below it.
func removeIfUnmounted(dir string) (bool, error) {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return false, err
	}
	if len(mounts) > 0 {
		return false, nil
	}
	return true, os.RemoveAll(dir)
}

// PoolStatus asks the daemon of dir how many VMs each template key has
// ready and handed out.
func PoolStatus(ctx context.Context, dir string) (map[string]PoolKeyStatus, error) {
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "unix", PoolSocket(dir))
	if err != nil {
		return nil, fmt.Errorf("pool daemon: %w: %w", errdefs.ErrUnavailable, err)
	}
	defer c.Close()
	conn := c.(*net.UnixConn)
	if err := writePoolMessage(conn, &poolRequest{Op: poolOpStatus}); err != nil {
		return nil, err
	}
	var rep poolReply
	if _, err := readPoolMessage(conn, &rep, 0, time.Now().Add(DefaultPoolTimeout)); err != nil {
		return nil, err
	}
	if rep.Error != "" {
		return nil, fmt.Errorf("pool daemon: %s: %w", rep.Error, errdefs.ErrUnavailable)
	}
	return rep.Status, nil
}

// RunPoolDaemon is the daemon's main: it serves dir for the templates of
// tc until it is idle or ctx ends; warm warms each pooled VM up (see
// PoolDaemon.Warm). first is the starting shim's request
// (nil: none).
func RunPoolDaemon(ctx context.Context, dir string, tc *TemplateCache, warm PoolWarmFunc, first *PoolJob, logf func(string, ...any)) error {
	d := &PoolDaemon{Dir: dir, Templates: tc, Logf: logf, Warm: warm}
	var req *poolRequest
	if first != nil {
		req = &poolRequest{Op: poolOpTake, Config: first.Config, Size: first.Size, IdleMs: first.IdleTimeout.Milliseconds()}
	}
	return d.Run(ctx, req)
}

// StopPool stops the pool daemon of dir by the pid in its pidfile
// (SIGTERM: the ready VMs go at once, the daemon exits when the VMs it
// handed out are gone) and waits until it has exited, up to timeout, then
// kills it. Whatever daemon ran, what it left is then reclaimed
// (ReclaimPool): the VMs no shim holds are killed, VMs in use are left to
// their shims. No daemon is no error.
func StopPool(dir string, timeout time.Duration) error {
	if err := stopPoolDaemon(dir, timeout); err != nil {
		return errors.Join(err, ReclaimPool(dir, nil))
	}
	return ReclaimPool(dir, nil)
}

func stopPoolDaemon(dir string, timeout time.Duration) error {
	b, err := os.ReadFile(PoolPidFile(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return fmt.Errorf("pool pidfile %s: %q: %w", PoolPidFile(dir), b, errdefs.ErrDataLoss)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil // gone
	}
	defer unix.Close(fd)
	// The pid must still be a pool daemon of dir (not a recycled pid):
	// checked after the pidfd is open, so the pidfd is the one checked.
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil || !strings.Contains(string(cmdline), dir) {
		return nil
	}
	unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0)
	if pidfdWait(fd, timeout) {
		return nil
	}
	unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	if pidfdWait(fd, 10*time.Second) {
		return fmt.Errorf("pool daemon %d did not stop within %v: killed: %w", pid, timeout, errdefs.ErrUnavailable)
	}
	return fmt.Errorf("pool daemon %d did not exit after SIGKILL: %w", pid, errdefs.ErrUnavailable)
}

// pidfdWait waits until the process of the pidfd has exited (a zombie
// counts: not our child, someone else reaps it).
func pidfdWait(fd int, timeout time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(timeout)
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms <= 0 {
			return false
		}
		n, err := unix.Poll(fds, ms)
		if err == nil && n > 0 {
			return true
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return false
		}
	}
}
