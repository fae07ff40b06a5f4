// Package run is the agent's main: it boots the guest when the agent is
// PID 1, starts the reaper and serves the host on the agent channel.
package run

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/guest-agent/internal/boot"
	"github.com/macvm/macvm/guest-agent/internal/container"
	"github.com/macvm/macvm/guest-agent/internal/network"
	"github.com/macvm/macvm/guest-agent/internal/reaper"
	"github.com/macvm/macvm/guest-agent/internal/service"
	"github.com/macvm/macvm/pkg/guest/transport"
)

// channelWait bounds the wait for the agent's channel: the virtio-serial
// port's driver probes asynchronously after the module is loaded, and the
// vsock transport needs its modules too (and a host that listens).
const channelWait = 30 * time.Second

// Main runs the agent and returns its exit code. As PID 1 it never returns
// normally: a fatal error powers the VM off (the kernel would panic if PID 1
// exited), so the host sees the VM exit with the reason on the console.
func Main() int {
	start := time.Now()
	logger := log.New(os.Stderr, "macvm-agent: ", log.Lmicroseconds)
	logf := logger.Printf
	pid1 := os.Getpid() == 1
	err := run(start, pid1, logf)
	logf("fatal: %v", err)
	if pid1 {
		boot.PowerOff()
		select {} // PowerOff failed: PID 1 must not exit
	}
	return 1
}

func run(start time.Time, pid1 bool, logf func(string, ...any)) error {
	if pid1 {
		if err := boot.Init(logf); err != nil {
			return err
		}
	} else if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		// Outside a VM (tests), orphans must still come to our reaper.
		return fmt.Errorf("set child subreaper: %w", err)
	}
	var modules <-chan struct{}
	if pid1 {
		modules = boot.LoadModulesAsync(logf)
	}
	opts, err := boot.ReadOptions()
	if err != nil {
		return err
	}
	r := reaper.New()
	go r.Run(nil)
	go dumpOnSIGQUIT(logf)

	events := service.NewEventQueue()
	streams := service.NewStreams()
	cfg := container.DefaultConfig()
	cfg.MountsReady = modules
	if opts.Debug {
		cfg.Trace = logf
	}
	mgr := container.NewManager(cfg, r, streams, events.OOM)
	powerOff := func() {
		if pid1 {
			boot.PowerOff()
		} else {
			os.Exit(0)
		}
	}
	if pid1 {
		// The containers' parent cgroup and a helper started ahead for the
		// first container (in a warm-start template both are saved with
		// the guest).
		if err := mgr.PrepareCgroups(); err != nil {
			logf("%v", err)
		}
		mgr.StartSpareAsync(logf)
	}
	svc := service.New(mgr, events, boot.CgroupRoot, powerOff)
	if pid1 {
		// The VM is the pod's network namespace: the agent configures
		// its NICs once virtio_net (a module) is loaded.
		nw, err := network.New(modules)
		if err != nil {
			return err
		}
		svc.SetNetwork(nw)
	}

	ch, err := openChannel(opts.Channel)
	if err != nil {
		return err
	}
	defer ch.Close()
	logf("channel %s:%s open %.3fs after start", opts.Channel.Kind, opts.Channel.Name, time.Since(start).Seconds())
	return svc.Serve(context.Background(), ch, streams, logf, func() {
		logf("host connected %.3fs after start", time.Since(start).Seconds())
	})
}

// openChannel opens the agent's channel (a virtio-serial port, or a vsock
// connection to the host), waiting for its driver to probe it.
func openChannel(c boot.Channel) (io.ReadWriteCloser, error) {
	open := func() (io.ReadWriteCloser, error) { return transport.OpenVirtioSerial(c.Name) }
	if c.Kind == "vsock" {
		port, err := strconv.ParseUint(c.Name, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("agent channel vsock:%s: %w", c.Name, errdefs.ErrInvalidArgument)
		}
		open = func() (io.ReadWriteCloser, error) { return transport.OpenVsock(uint32(port)) }
	}
	deadline := time.Now().Add(channelWait)
	for {
		ch, err := open()
		if err == nil {
			return ch, nil
		}
		// Not there yet: the port or the vsock transport is still being
		// probed, or (vsock) the host does not listen yet.
		retry := errors.Is(err, errdefs.ErrNotFound) || c.Kind == "vsock" && errors.Is(err, errdefs.ErrUnavailable)
		if !retry || time.Now().After(deadline) {
			return nil, fmt.Errorf("open agent channel %s:%s: %w", c.Kind, c.Name, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dumpOnSIGQUIT writes every goroutine's stack to the console each time the
// agent gets SIGQUIT, and goes on: evidence for a stalled guest (an RPC that
// never answers) without a debugger. Without this, Go's own SIGQUIT handler
// dumps and exits, and PID 1 exiting panics the guest kernel (seen in the
// stress test of e2e/guest). Any process that shares the agent's PID
// namespace can send it (a container without a PID namespace: kill -QUIT 1).
func dumpOnSIGQUIT(logf func(string, ...any)) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGQUIT)
	for range sigs {
		buf := make([]byte, 1<<20)
		for {
			n := runtime.Stack(buf, true)
			if n < len(buf) || len(buf) >= 16<<20 {
				buf = buf[:n]
				break
			}
			buf = make([]byte, 2*len(buf))
		}
		logf("SIGQUIT: goroutine dump (%d bytes) follows\n%s\nmacvm-agent: SIGQUIT: goroutine dump ends", len(buf), buf)
	}
}
