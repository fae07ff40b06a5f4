package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/guest/transport"
)

const (
	// stdinQuiet is how long CloseIO waits for more bytes in the stdin FIFO
	// before it declares the FIFO drained. Whatever the client wrote before
	// asking to close stdin is already in the pipe buffer, so a short quiet
	// period is enough.
	stdinQuiet = 50 * time.Millisecond
	// loggerReadyTimeout bounds the wait for a binary:// logging driver to
	// signal readiness, so a broken driver fails Create instead of hanging it.
	loggerReadyTimeout = 10 * time.Second
	// loggerExitTimeout is how long a logging driver gets to flush and exit
	// after its pipes are closed before it is terminated.
	loggerExitTimeout = 12 * time.Second
)

// stdioSpec is what containerd asked for a process's standard I/O: FIFO
// paths (ctr, CRI), or a log URI (file:// or binary://) in stdout.
type stdioSpec struct {
	stdin, stdout, stderr string
	terminal              bool
}

func (s stdioSpec) isNull() bool { return s.stdin == "" && s.stdout == "" && s.stderr == "" }

// processIO joins a process's host-side stdio to its agent streams. Each
// direction is one goroutine: the stdin copier moves the FIFO into the
// stream; the output copiers move the streams into FIFOs, a file or a
// logging driver's pipes. The host ends are closed once every output
// copier is done, which is what lets a client reading the FIFOs see EOF.
type processIO struct {
	// names is what the agent is told, in CreateContainer or ExecProcess.
	names *agent.Stdio

	stdinStream net.Conn
	// stdinSrc is the stdin FIFO opened read-write: holding a write end
	// ourselves means a client that detaches (closes its end) does not
	// send EOF to the process; only CloseIO does.
	stdinSrc     *os.File
	stdinClosing atomic.Bool
	stdinDone    chan struct{}
	stdinOnce    sync.Once
	// stdinStart starts the stdin copier, once: not before the process is
	// started. Until then the client's writes wait in the FIFO, which is
	// what lets ctr arm its CloseIO-on-EOF (it does so only after Create
	// returned) before it can reach the end of its input.
	stdinStart sync.Once
	// ctx is for the copiers' logging.
	ctx context.Context

	outputs []net.Conn
	// outDone is closed when every output copier has returned and the host
	// ends are closed.
	outDone chan struct{}

	closeOnce sync.Once
	// closers release the host ends (FIFOs, log file, logger pipes).
	closers []func() error
	logger  *binaryLogger
}

// streamOpener is the part of agentClient processIO needs.
type streamOpener interface {
	OpenStream(name string) (net.Conn, error)
}

// newProcessIO opens the host ends named by spec and one agent stream per
// used descriptor (named prefix-stdin, prefix-stdout, prefix-stderr) and
// starts the copiers. The streams must exist before the RPC that names them.
func newProcessIO(ctx context.Context, so streamOpener, prefix string, spec stdioSpec, containerID, namespace string) (_ *processIO, retErr error) {
	pio := &processIO{
		ctx:       ctx,
		names:     &agent.Stdio{Terminal: spec.terminal},
		stdinDone: make(chan struct{}),
		outDone:   make(chan struct{}),
	}
	defer func() {
		if retErr != nil {
			pio.close()
		}
	}()

	var stdoutW, stderrW io.Writer
	if spec.stdout != "" || spec.stderr != "" {
		u, err := url.Parse(spec.stdout)
		if err != nil {
			return nil, fmt.Errorf("stdout uri %q: %v: %w", spec.stdout, err, errdefs.ErrInvalidArgument)
		}
		switch u.Scheme {
		case "", "fifo":
			if spec.stdout != "" {
				f, err := openOutput(filepath.Join(u.Host, u.Path))
				if err != nil {
					return nil, err
				}
				pio.closers = append(pio.closers, f.Close)
				stdoutW = f
			}
			if spec.stderr != "" && !spec.terminal {
				f, err := openOutput(spec.stderr)
				if err != nil {
					return nil, err
				}
				pio.closers = append(pio.closers, f.Close)
				stderrW = f
			}
		case "file":
			if err := os.MkdirAll(filepath.Dir(u.Path), 0o755); err != nil {
				return nil, fmt.Errorf("log file directory: %w", err)
			}
			f, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
			if err != nil {
				return nil, fmt.Errorf("log file: %w", err)
			}
			pio.closers = append(pio.closers, f.Close)
			// Both streams write whole buffers to one O_APPEND file; a
			// mutex keeps a stdout chunk and a stderr chunk from interleaving
			// inside one write.
			w := &lockedWriter{w: f}
			stdoutW = w
			if !spec.terminal {
				stderrW = w
			}
		case "binary", "binary-v2":
			l, err := startBinaryLogger(ctx, u, containerID, namespace)
			if err != nil {
				return nil, err
			}
			pio.logger = l
			stdoutW = l.out
			if !spec.terminal {
				stderrW = l.err
			}
		default:
			return nil, fmt.Errorf("stdio scheme %q is not supported (want a FIFO path, file:// or binary://): %w", u.Scheme, errdefs.ErrInvalidArgument)
		}
	}

	if spec.stdin != "" {
		f, err := os.OpenFile(spec.stdin, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin fifo: %w", err)
		}
		growStdinFifo(f)
		pio.stdinSrc = f
		name := prefix + "-stdin"
		if pio.stdinStream, err = so.OpenStream(name); err != nil {
			return nil, fmt.Errorf("open stdin stream: %w", err)
		}
		pio.names.Stdin = name
	}
	type output struct {
		w    io.Writer
		name string
		set  *string
	}
	var outs []output
	if stdoutW != nil {
		outs = append(outs, output{stdoutW, prefix + "-stdout", &pio.names.Stdout})
	}
	if stderrW != nil {
		outs = append(outs, output{stderrW, prefix + "-stderr", &pio.names.Stderr})
	}
	for _, o := range outs {
		c, err := so.OpenStream(o.name)
		if err != nil {
			return nil, fmt.Errorf("open %s stream: %w", o.name, err)
		}
		// The host never writes to an output stream.
		closeWrite(c)
		pio.outputs = append(pio.outputs, c)
		*o.set = o.name
	}

	// Copiers start only when everything is open, so an error above never
	// leaves a goroutine behind.
	if pio.stdinSrc == nil {
		close(pio.stdinDone)
	}
	var wg sync.WaitGroup
	for i, o := range outs {
		wg.Add(1)
		go func(c net.Conn, w io.Writer) {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			if _, err := io.CopyBuffer(w, c, buf); err != nil && !errors.Is(err, net.ErrClosed) {
				log.G(ctx).WithError(err).WithField("stream", o.name).Debug("copy output")
			}
		}(pio.outputs[i], o.w)
	}
	go func() {
		wg.Wait()
		pio.closeHostEnds(ctx)
		close(pio.outDone)
	}()
	return pio, nil
}

// openOutput opens an output FIFO read-write: holding a read end keeps our
// writes from failing with EPIPE while no client reads (detach), and the
// data waits in the pipe for the next reader. A path that is not a FIFO is
// appended to like a file.
func openOutput(path string) (*os.File, error) {
	fi, err := os.Stat(path)
	if err == nil && fi.Mode()&os.ModeNamedPipe != 0 {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open output fifo: %w", err)
		}
		return f, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open output: %w", err)
	}
	return f, nil
}

type lockedWriter struct {
	// mu serialises writes to w.
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// startStdin starts copying the client's input to the process.
func (p *processIO) startStdin() {
	if p.stdinSrc == nil {
		return
	}
	p.stdinStart.Do(func() { go p.copyStdin(p.ctx) })
}

// stdinChunk is the largest stdin read, the transport's largest frame body.
const stdinChunk = transport.MaxFrameBody

func (p *processIO) copyStdin(ctx context.Context) {
	defer close(p.stdinDone)
	defer p.stdinSrc.Close()
	// One read is one transport frame. Under TCG the guest pays per frame
	// (its agent's wake-up and pipe write, the process's read), so reads
	// take up to a whole frame's worth rather than io.Copy's 32 KiB.
	buf := make([]byte, stdinChunk)
	for {
		n, err := p.stdinSrc.Read(buf)
		if n > 0 {
			if _, werr := p.stdinStream.Write(buf[:n]); werr != nil {
				log.G(ctx).WithError(werr).Debug("copy stdin")
				return
			}
		}
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) || !p.stdinClosing.Load() {
				if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
					log.G(ctx).WithError(err).Debug("read stdin")
				}
			}
			break
		}
		if p.stdinClosing.Load() {
			_ = p.stdinSrc.SetReadDeadline(time.Now().Add(stdinQuiet))
		}
	}
	closeWrite(p.stdinStream)
}

// closeStdin delivers what the client has written so far and then EOF to
// the process (CloseIO). It returns when the stream is half-closed or ctx
// ends.
func (p *processIO) closeStdin(ctx context.Context) {
	if p.stdinSrc == nil {
		if p.stdinStream != nil {
			closeWrite(p.stdinStream)
		}
		return
	}
	p.startStdin()
	p.stdinOnce.Do(func() {
		p.stdinClosing.Store(true)
		if err := p.stdinSrc.SetReadDeadline(time.Now().Add(stdinQuiet)); err != nil {
			// Not pollable: the copier cannot be woken, so stop it now.
			p.stdinSrc.Close()
		}
	})
	select {
	case <-p.stdinDone:
	case <-ctx.Done():
	}
}

// wait returns once the output is fully delivered and the host ends are
// closed, or after timeout; then it cuts the streams, so a guest process
// that leaves a daemonised child holding its stdout cannot hold up the
// exit. It reports whether the output completed by itself.
func (p *processIO) wait(timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.outDone:
		return true
	case <-t.C:
	}
	for _, c := range p.outputs {
		c.Close()
	}
	select {
	case <-p.outDone:
	case <-time.After(time.Second):
		// A copier is stuck writing to a FIFO nobody reads: closing the
		// host ends wakes it.
		go p.closeHostEnds(context.Background())
	}
	return false
}

// close releases everything: streams, FIFOs, the logging driver.
func (p *processIO) close() {
	if p.stdinSrc != nil {
		p.stdinSrc.Close()
	}
	if p.stdinStream != nil {
		p.stdinStream.Close()
	}
	for _, c := range p.outputs {
		c.Close()
	}
	p.closeHostEnds(context.Background())
}

func (p *processIO) closeHostEnds(ctx context.Context) {
	p.closeOnce.Do(func() {
		for _, c := range p.closers {
			_ = c()
		}
		if p.logger != nil {
			if err := p.logger.close(); err != nil {
				log.G(ctx).WithError(err).Warn("logging driver did not exit cleanly")
			}
		}
	})
}

// binaryLogger is a binary:// logging driver: a program that gets the
// process's stdout and stderr as fds 3 and 4 and signals readiness by
// writing to (or closing) fd 5.
type binaryLogger struct {
	cmd      *exec.Cmd
	out, err *os.File
	exited   chan struct{}
}

func startBinaryLogger(ctx context.Context, u *url.URL, id, ns string) (_ *binaryLogger, retErr error) {
	var args []string
	for k, vs := range u.Query() {
		args = append(args, k)
		if len(vs) > 0 {
			args = append(args, vs[0])
		}
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, err
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		return nil, err
	}
	defer readyR.Close()
	defer outR.Close()
	defer errR.Close()
	cmd := exec.Command(u.Path, args...)
	cmd.Env = append(os.Environ(), "CONTAINER_ID="+id, "CONTAINER_NAMESPACE="+ns)
	cmd.ExtraFiles = []*os.File{outR, errR, readyW}
	err = cmd.Start()
	readyW.Close()
	if err != nil {
		outW.Close()
		errW.Close()
		return nil, fmt.Errorf("start logging driver %s: %w", u.Path, err)
	}
	l := &binaryLogger{cmd: cmd, out: outW, err: errW, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(l.exited)
	}()
	defer func() {
		if retErr != nil {
			_ = cmd.Process.Kill()
			l.out.Close()
			l.err.Close()
		}
	}()

	ready := make(chan int, 1)
	go func() {
		b := make([]byte, 1)
		n, _ := readyR.Read(b)
		ready <- n
	}()
	select {
	case n := <-ready:
		if u.Scheme == "binary-v2" && n == 0 {
			return nil, fmt.Errorf("logging driver %s exited before signalling readiness", u.Path)
		}
	case <-time.After(loggerReadyTimeout):
		return nil, fmt.Errorf("logging driver %s not ready after %v: %w", u.Path, loggerReadyTimeout, context.DeadlineExceeded)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return l, nil
}

// close ends the driver's input and gives it time to flush before it is
// terminated.
func (l *binaryLogger) close() error {
	l.out.Close()
	l.err.Close()
	select {
	case <-l.exited:
		return nil
	case <-time.After(loggerExitTimeout):
	}
	_ = l.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-l.exited:
	case <-time.After(2 * time.Second):
		_ = l.cmd.Process.Kill()
		<-l.exited
	}
	return fmt.Errorf("logging driver %s did not exit within %v of its input closing", l.cmd.Path, loggerExitTimeout)
}
