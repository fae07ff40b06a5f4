package vm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// take asks the daemon for a pooled VM of cfg, whose template key is key,
// and returns it started: its QMP handshake done and its CPUs running.
// No daemon (one is spawned), an empty pool or a bad reply is an error;
// the caller then starts a template clone itself.
func (pc *PoolClient) take(ctx context.Context, cfg Config, key string) (*QEMU, error) {
	asked := time.Now()
	timeout := pc.Timeout
	if timeout <= 0 {
		timeout = DefaultPoolTimeout
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(dctx, "unix", PoolSocket(pc.Dir))
	if err != nil {
		if pc.Size > 0 && pc.Spawn != nil && (errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)) {
			pc.Spawn(cfg)
			return nil, fmt.Errorf("no pool daemon yet (starting one): %w", errdefs.ErrUnavailable)
		}
		return nil, fmt.Errorf("pool daemon: %w: %w", errdefs.ErrUnavailable, err)
	}
	conn := c.(*net.UnixConn)
	keep := false
	defer func() {
		if !keep {
			// Closing the lease makes the daemon kill and reap whatever
			// it handed over.
			conn.Close()
		}
	}()
	req := poolRequest{Op: poolOpTake, Config: cfg, Size: pc.Size, IdleMs: pc.idle().Milliseconds()}
	req.Config.Templates = nil
	_ = conn.SetWriteDeadline(asked.Add(timeout))
	if err := writePoolMessage(conn, &req); err != nil {
		return nil, err
	}
	var rep poolReply
	files, err := readPoolMessage(conn, &rep, poolFDCount+maxPoolNICs, asked.Add(timeout))
	if err != nil {
		return nil, err
	}
	h := pooledHandles{lease: conn, asked: asked}
	defer func() {
		if !keep {
			h.close()
		}
	}()
	if len(files) == poolFDCount+len(rep.NICs) {
		h.qmp, h.agent, h.pidfd = files[0], files[1], files[2]
		h.nics = files[poolFDCount:]
	} else {
		for _, f := range files {
			f.Close()
		}
	}
	switch {
	case rep.Empty:
		return nil, fmt.Errorf("pool of template %s: %s: %w", key, rep.Error, errdefs.ErrNotFound)
	case rep.Error != "":
		return nil, fmt.Errorf("pool daemon: %s: %w", rep.Error, errdefs.ErrUnavailable)
	case h.pidfd == nil:
		return nil, fmt.Errorf("pool daemon handed over %d descriptors, want %d: %w", len(files), poolFDCount, errdefs.ErrDataLoss)
	case rep.Key != key:
		return nil, fmt.Errorf("pool daemon handed over a VM of template %s, want %s: %w", rep.Key, key, errdefs.ErrDataLoss)
	case len(rep.Shares) != len(cfg.Shares) || rep.Dir == "" || rep.Pid <= 0:
		return nil, fmt.Errorf("pool daemon: reply without the VM's directories: %w", errdefs.ErrDataLoss)
	}
	standIns, err := pooledStandIns(cfg, rep.NICs, h.nics)
	if err != nil {
		return nil, err
	}
	pcfg := cfg
	pcfg.StateDir = rep.Dir
	pcfg.Templates = nil
	pcfg.Shares = make([]Share, len(cfg.Shares))
	for i, s := range cfg.Shares {
		s.HostPath = rep.Shares[i]
		pcfg.Shares[i] = s
	}
	q, err := NewQEMU(pcfg)
	if err != nil {
		return nil, err
	}
	q.pooled = true
	h.pid = rep.Pid
	nicFiles := h.nics
	h.nics = nil
	defer closeFiles(nicFiles)
	keep = true // startPooled owns the handles now, failing or not
	if err := q.startPooled(ctx, h); err != nil {
		return nil, err
	}
	// The NICs are adopted once the VM runs: an adoption leaves the
	// caller's backend in place until it succeeds, so a VM that failed to
	// come up leaves a network the template clone can still use.
	for i, si := range standIns {
		if err := cfg.NICs[i].Adopt(si); err != nil {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			q.Stop(sctx)
			cancel()
			err = fmt.Errorf("vm %s: adopting the pooled VM's NIC %d (%s): %w", cfg.ID, i, si.Kind, err)
			for _, n := range cfg.NICs[:i] {
				if rerr := n.Reclaim(); rerr != nil {
					err = fmt.Errorf("%w; reclaiming its NIC: %w", err, rerr)
				}
			}
			return nil, err
		}
	}
	return q, nil
}

// pooledStandIns pairs the NICs a hand-over brings (meta, and one file
// each) with cfg's, which must match them in number and kind and be able
// to adopt them.
func pooledStandIns(cfg Config, meta []poolNIC, files []*os.File) ([]StandIn, error) {
	if len(meta) != len(cfg.NICs) || len(files) != len(meta) {
		return nil, fmt.Errorf("pool daemon handed over %d NICs (%d descriptors), want %d: %w", len(meta), len(files), len(cfg.NICs), errdefs.ErrDataLoss)
	}
	out := make([]StandIn, len(meta))
	for i, m := range meta {
		n := cfg.NICs[i]
		if m.Kind != n.Kind {
			return nil, fmt.Errorf("pool daemon handed over a %s NIC %d, want %s: %w", m.Kind, i, n.Kind, errdefs.ErrDataLoss)
		}
		if n.Adopt == nil || n.Reclaim == nil {
			return nil, fmt.Errorf("NIC %d (%s) cannot adopt a pooled VM's: %w", i, n.Kind, errdefs.ErrNotImplemented)
		}
		switch m.Kind {
		case NICTap:
			if m.Name == "" {
				return nil, fmt.Errorf("pool daemon handed over tap NIC %d without its name: %w", i, errdefs.ErrDataLoss)
			}
			out[i] = StandIn{Kind: NICTap, Netns: files[i], Name: m.Name}
		default:
			out[i] = StandIn{Kind: m.Kind, File: files[i]}
		}
	}
	return out, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

func (pc *PoolClient) idle() time.Duration {
	if pc.IdleTimeout > 0 {
		return pc.IdleTimeout
	}
	return DefaultPoolIdleTimeout
}

// pooledHandles are what a hand-over brings.
type pooledHandles struct {
	qmp, agent, pidfd *os.File
	// nics are the NICs' descriptors (pooledStandIns).
	nics []*os.File
	pid  int
	// lease is the connection to the daemon, open as long as the VM is
	// ours; closing it makes the daemon reap the qemu and clean up.
	lease net.Conn
	asked time.Time
}

func (h *pooledHandles) close() {
	for _, f := range []*os.File{h.qmp, h.agent, h.pidfd} {
		if f != nil {
			f.Close()
		}
	}
	closeFiles(h.nics)
	if h.lease != nil {
		h.lease.Close()
	}
}

// startPooled adopts a VM the daemon restored, warmed up and left paused:
// QMP handshake on its (untouched) monitor, then `cont`. It owns h: on
// failure everything in it is closed and the qemu killed.
func (q *QEMU) startPooled(ctx context.Context, h pooledHandles) (retErr error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.started {
		h.close()
		return fmt.Errorf("vm %s: already started: %w", q.cfg.ID, errdefs.ErrFailedPrecondition)
	}
	q.started = true
	qmpConn, err := net.FileConn(h.qmp)
	if err != nil {
		h.close()
		return q.failEarly(fmt.Errorf("vm %s: pooled QMP socket: %w", q.cfg.ID, err))
	}
	agentConn, err := net.FileConn(h.agent)
	if err != nil {
		qmpConn.Close()
		h.close()
		return q.failEarly(fmt.Errorf("vm %s: pooled agent socket: %w", q.cfg.ID, err))
	}
	h.qmp.Close()
	h.agent.Close()
	q.bootStarted = h.asked
	q.attach(&pidfdProcess{fd: h.pidfd, id: h.pid, lease: h.lease}, agentConn, qmpConn)
	defer q.undoFailedStart(&retErr)
	q.mu.Unlock()
	err = q.qmp.handshake(ctx)
	if err == nil {
		err = q.swapPooledDisks(ctx)
	}
	if err == nil {
		_, err = q.qmp.execute(ctx, "cont", nil)
	}
	q.mu.Lock()
	if err != nil {
		return fmt.Errorf("vm %s: pooled qemu did not come up: %w", q.cfg.ID, err)
	}
	// Restored from a template saved with the agent's port open.
	q.agentOpenOnce.Do(func() { close(q.agentOpen) })
	return nil
}

// ShareDirs is the host directories the VM's shares serve (a pooled VM's
// own, below the daemon's directory).
func (q *QEMU) ShareDirs() []string {
	if !q.pooled {
		return nil
	}
	dirs := make([]string, len(q.cfg.Shares))
	for i, s := range q.cfg.Shares {
		dirs[i] = s.HostPath
	}
	return dirs
}

// PoolDir is the pooled VM's own directory below the pool's, which
// qemu's command line names; "" for a VM this process started.
func (q *QEMU) PoolDir() string {
	if !q.pooled {
		return ""
	}
	return q.cfg.StateDir
}

// pidfdProcess is a qemu started by the pool daemon: not our child, so it
// is watched through a pidfd (readable once it exited) and signalled
// through it (no pid reuse race); the daemon reaps it.
type pidfdProcess struct {
	id    int
	lease net.Conn

	mu sync.Mutex // guards fd, closed once the process has exited
	fd *os.File
}

func (p *pidfdProcess) pid() int { return p.id }

func (p *pidfdProcess) kill() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fd == nil {
		return nil
	}
	err := unix.PidfdSendSignal(int(p.fd.Fd()), unix.SIGKILL, nil, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// wait blocks until the qemu has exited, then ends the lease so the
// daemon reaps it and removes its directory.
func (p *pidfdProcess) wait() error {
	p.mu.Lock()
	fd := int(p.fd.Fd())
	p.mu.Unlock()
	var err error
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		_, err = unix.Poll(fds, -1)
		if err == nil && fds[0].Revents != 0 {
			break
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			break
		}
	}
	p.mu.Lock()
	p.fd.Close()
	p.fd = nil
	p.mu.Unlock()
	p.lease.Close()
	if err != nil {
		return fmt.Errorf("waiting for pooled qemu %d: %w", p.id, err)
	}
	return nil
}

// swapPooledDisks gives the paused pooled VM its disks: the daemon started
// it with empty stand-in files, like its template's (diskFileNode), and
// each raw node (diskNode) is reopened on a new file node of the image in
// q.cfg. The guest saw the stand-in with no capacity and read nothing
// from it; the agent re-probes a disk it sees empty before mounting it,
// as in a template clone, and reads the image's capacity then.
func (q *QEMU) swapPooledDisks(ctx context.Context) error {
	for i, d := range q.cfg.Disks {
		node := diskNode(i) + "-image"
		if _, err := q.qmp.execute(ctx, "blockdev-add", map[string]any{
			"driver": "file", "node-name": node, "filename": d.Path, "read-only": d.ReadOnly,
		}); err != nil {
			return fmt.Errorf("vm %s: disk %d (%s): %w", q.cfg.ID, i, d.Path, err)
		}
		if _, err := q.qmp.execute(ctx, "blockdev-reopen", map[string]any{"options": []map[string]any{{
			"driver": "raw", "node-name": diskNode(i), "file": node, "read-only": d.ReadOnly,
		}}}); err != nil {
			return fmt.Errorf("vm %s: disk %d: swapping the stand-in for %s: %w", q.cfg.ID, i, d.Path, err)
		}
		// The stand-in's node is unused now: it goes, with its file.
		if _, err := q.qmp.execute(ctx, "blockdev-del", map[string]any{"node-name": diskFileNode(i)}); err != nil {
			return fmt.Errorf("vm %s: disk %d: dropping the stand-in: %w", q.cfg.ID, i, err)
		}
	}
	return nil
}
