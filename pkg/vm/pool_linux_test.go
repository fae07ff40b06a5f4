package vm

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// unixPair is a connected pair of unix stream sockets.
func unixPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// TestPoolMessageFDs: a reply's descriptors arrive with it, in order,
// and work on the receiving side.
func TestPoolMessageFDs(t *testing.T) {
	a, b := unixPair(t)
	var pipes [poolFDCount][2]*os.File
	var send []*os.File
	for i := range pipes {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		defer w.Close()
		pipes[i] = [2]*os.File{r, w}
		send = append(send, w)
	}
	rep := poolReply{Key: "k", Pid: 42, Dir: "/d", Shares: []string{"/d/share0"}}
	if err := writePoolMessage(a, &rep, send...); err != nil {
		t.Fatal(err)
	}
	var got poolReply
	files, err := readPoolMessage(b, &got, poolFDCount, time.Now().Add(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if got.Key != "k" || got.Pid != 42 || got.Dir != "/d" || len(got.Shares) != 1 || len(files) != poolFDCount {
		t.Fatalf("got %+v with %d files", got, len(files))
	}
	for i, f := range files {
		msg := []byte{byte('a' + i)}
		if _, err := f.Write(msg); err != nil {
			t.Fatalf("fd %d: %v", i, err)
		}
		f.Close()
		buf := make([]byte, 1)
		if _, err := io.ReadFull(pipes[i][0], buf); err != nil || buf[0] != msg[0] {
			t.Fatalf("pipe %d read %q, %v: descriptors out of order", i, buf, err)
		}
	}
}

// TestPoolMessageBad: more descriptors than wanted, a garbled line or a
// closed connection are errors, and descriptors that came are closed.
func TestPoolMessageBad(t *testing.T) {
	a, b := unixPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := writePoolMessage(a, &poolReply{Key: "k"}, w, w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	var rep poolReply
	if _, err := readPoolMessage(b, &rep, 1, time.Now().Add(10*time.Second)); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("two descriptors where one is wanted: %v", err)
	}
	// Every copy of the write end is closed: the read end sees EOF.
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("received descriptors leaked: read %d, %v", n, err)
	}

	if _, err := a.Write([]byte("{not json\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := readPoolMessage(b, &rep, 0, time.Now().Add(10*time.Second)); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("garbled message: %v", err)
	}
	a.Write([]byte(`{"key":`))
	a.Close()
	if _, err := readPoolMessage(b, &rep, 0, time.Now().Add(10*time.Second)); err == nil {
		t.Fatal("half a message then EOF: no error")
	}
}

// fakeConfig is a VM configuration NewQEMU accepts without booting
// anything (the kernel only has to exist).
func fakeConfig(t *testing.T) Config {
	t.Helper()
	if _, err := exec.LookPath(DefaultQEMU); err != nil {
		t.Skipf("%s not installed: %v", DefaultQEMU, err)
	}
	dir := t.TempDir()
	kernel := filepath.Join(dir, "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	return Config{ID: "t", StateDir: filepath.Join(dir, "state"), Kernel: kernel, CPUs: 1, MemoryMiB: 128,
		Shares: []Share{{Tag: "shared", HostPath: filepath.Join(dir, "shared")}}}
}

// fakeDaemon answers every pool request on dir's socket with reply
// (and files), then holds the connection until the client closes it;
// leaseEnded receives once per closed lease.
func fakeDaemon(t *testing.T, dir string, reply poolReply, files func() []*os.File) (requests chan poolRequest, leaseEnded chan struct{}) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: PoolSocket(dir), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	requests, leaseEnded = make(chan poolRequest, 10), make(chan struct{}, 10)
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			var req poolRequest
			if _, err := readPoolMessage(c, &req, 0, time.Now().Add(10*time.Second)); err != nil {
				c.Close()
				continue
			}
			requests <- req
			var fs []*os.File
			if files != nil {
				fs = files()
			}
			writePoolMessage(c, &reply, fs...)
			for _, f := range fs {
				f.Close()
			}
			io.Copy(io.Discard, c)
			c.Close()
			leaseEnded <- struct{}{}
		}
	}()
	return requests, leaseEnded
}

// TestPoolTakeNoDaemon: no daemon answering means a spawn (when the pool
// has a size) and an error the caller falls back on.
func TestPoolTakeNoDaemon(t *testing.T) {
	cfg := fakeConfig(t)
	var spawned atomic.Int32
	pc := &PoolClient{Dir: t.TempDir(), Size: 2, Spawn: func(c Config) {
		if c.ID != cfg.ID {
			t.Errorf("spawned for %q", c.ID)
		}
		spawned.Add(1)
	}}
	if _, err := pc.take(t.Context(), cfg, "key"); !errdefs.IsUnavailable(err) || spawned.Load() != 1 {
		t.Fatalf("no socket: %v, %d spawns", err, spawned.Load())
	}
	// A stale socket (the daemon was killed) is refused: spawn again.
	l, err := net.Listen("unix", PoolSocket(pc.Dir))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := pc.take(t.Context(), cfg, "key"); !errdefs.IsUnavailable(err) || spawned.Load() != 2 {
		t.Fatalf("stale socket: %v, %d spawns", err, spawned.Load())
	}
	pc.Size = 0
	if _, err := pc.take(t.Context(), cfg, "key"); !errdefs.IsUnavailable(err) || spawned.Load() != 2 {
		t.Fatalf("pool_size 0: %v, %d spawns (want none more)", err, spawned.Load())
	}
}

// TestPoolTakeBadReplies: an empty pool, a VM of another key, a reply
// without descriptors or directories all fail the take (the caller
// starts a clone) and end the lease, so the daemon reaps what it sent.
func TestPoolTakeBadReplies(t *testing.T) {
	cfg := fakeConfig(t)
	pipeFiles := func() []*os.File {
		var fs []*os.File
		for range poolFDCount {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			w.Close()
			fs = append(fs, r)
		}
		return fs
	}
	good := poolReply{Key: "key", Pid: 1, Dir: "/x", Shares: []string{"/x/share0"}}
	wrongKey := good
	wrongKey.Key = "other"
	noShares := good
	noShares.Shares = nil
	for _, tc := range []struct {
		name  string
		reply poolReply
		files func() []*os.File
		is    func(error) bool
	}{
		{"empty", poolReply{Empty: true, Error: "no VM ready"}, nil, errdefs.IsNotFound},
		{"daemon error", poolReply{Error: "broken"}, nil, errdefs.IsUnavailable},
		{"no descriptors", good, nil, errdefs.IsDataLoss},
		{"wrong key", wrongKey, pipeFiles, errdefs.IsDataLoss},
		{"no shares", noShares, pipeFiles, errdefs.IsDataLoss},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			reqs, ended := fakeDaemon(t, dir, tc.reply, tc.files)
			pc := &PoolClient{Dir: dir, Size: 3, IdleTimeout: time.Minute, Spawn: func(Config) { t.Error("spawned with a daemon running") }}
			_, err := pc.take(t.Context(), cfg, "key")
			if !tc.is(err) {
				t.Fatalf("take: %v", err)
			}
			req := <-reqs
			if req.Op != poolOpTake || req.Size != 3 || req.IdleMs != time.Minute.Milliseconds() || req.Config.Kernel != cfg.Kernel {
				t.Errorf("request %+v", req)
			}
			select {
			case <-ended:
			case <-time.After(10 * time.Second):
				t.Fatal("the lease was not closed after a failed take")
			}
		})
	}
}

// TestPidfdProcess: a process that is not our child is killed through
// its pidfd, wait notices its exit and ends the lease.
func TestPidfdProcess(t *testing.T) {
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go cmd.Wait() // the "daemon" reaps
	fd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	lease, daemonEnd := unixPair(t)
	p := &pidfdProcess{id: cmd.Process.Pid, fd: os.NewFile(uintptr(fd), "pidfd"), lease: lease}
	waited := make(chan error, 1)
	go func() { waited <- p.wait() }()
	select {
	case err := <-waited:
		t.Fatalf("wait returned while the process runs: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := p.kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("wait did not return after the kill")
	}
	daemonEnd.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := daemonEnd.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("lease after the exit: %v, want EOF", err)
	}
	if err := p.kill(); err != nil {
		t.Errorf("kill after the exit: %v", err)
	}
}

// TestPoolDaemonLifecycle: a daemon without a template answers takes
// with an empty pool and counts the key; a take with size 0 drops the
// key's pool and, with nothing else to serve, the daemon exits and
// removes its socket and pidfile. A second daemon on the same directory
// is refused while the first runs.
func TestPoolDaemonLifecycle(t *testing.T) {
	cfg := fakeConfig(t)
	tdir := t.TempDir()
	dir := filepath.Join(tdir, "pool")
	d := &PoolDaemon{Dir: dir, Templates: &TemplateCache{Dir: tdir}, Logf: t.Logf}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- d.Run(ctx, &poolRequest{Op: poolOpTake, Config: cfg, Size: 1, IdleMs: 60000}) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(PoolPidFile(dir)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no pidfile")
		}
		time.Sleep(10 * time.Millisecond)
	}
	second := &PoolDaemon{Dir: dir, Templates: d.Templates}
	if err := second.Run(ctx, nil); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second daemon: %v, want ErrAlreadyExists", err)
	}

	pc := &PoolClient{Dir: dir, Size: 1, IdleTimeout: time.Minute}
	if _, err := pc.take(ctx, cfg, "whatever"); !errdefs.IsNotFound(err) {
		t.Fatalf("take without a template: %v, want an empty pool", err)
	}
	st, err := PoolStatus(ctx, dir)
	if err != nil || len(st) != 1 {
		t.Fatalf("status %v, %v", st, err)
	}
	for _, s := range st {
		if s.Size != 1 || s.Ready != 0 || s.Leased != 0 {
			t.Errorf("status %+v", s)
		}
	}
	pc.Size = 0
	if _, err := pc.take(ctx, cfg, "whatever"); !errdefs.IsNotFound(err) {
		t.Fatalf("take with size 0: %v", err)
	}
	select {
	case err := <-ran:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not exit with its only pool at size 0")
	}
	for _, p := range []string{PoolSocket(dir), PoolPidFile(dir)} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left: %v", p, err)
		}
	}
	if err := StopPool(dir, time.Second); err != nil {
		t.Errorf("StopPool without a daemon: %v", err)
	}
}

// TestPoolDaemonIdle: a daemon whose only pool gets no request for its
// idle time exits by itself.
func TestPoolDaemonIdle(t *testing.T) {
	cfg := fakeConfig(t)
	tdir := t.TempDir()
	dir := filepath.Join(tdir, "pool")
	d := &PoolDaemon{Dir: dir, Templates: &TemplateCache{Dir: tdir}, Logf: t.Logf}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	start := time.Now()
	ran := make(chan error, 1)
	go func() { ran <- d.Run(ctx, &poolRequest{Op: poolOpTake, Config: cfg, Size: 2, IdleMs: 500}) }()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the daemon did not exit after its pool's idle time")
	}
	if waited := time.Since(start); waited < 500*time.Millisecond {
		t.Errorf("exited after %v, before the idle time", waited)
	}
	if _, err := os.Stat(PoolPidFile(dir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pidfile left: %v", err)
	}
}
