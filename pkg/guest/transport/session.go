// Package transport gives the host and the guest agent independent,
// flow-controlled byte streams over one raw channel (virtio-serial under
// QEMU, a vsock connection under Virtualization.framework).
//
// The raw channel has no framing and, on virtio-serial, survives host
// reconnects with stale bytes in both directions, so every session starts
// with a resync handshake (Connect on the host, Accept in the guest) and then
// runs yamux. The host opens every stream; each carries a short name header
// so the guest can route it: ControlStream goes to the ttrpc server (see
// Listener), the others are stdio streams claimed from a StreamTable by the
// RPC that names them.
//
// The handshake, byte for byte:
//
//	host  -> guest  "\x00MACVM-SYNC1:<nonce>\n"   nonce: 16 lowercase hex digits, new per Connect;
//	                 resent at 50 ms, 100 ms, ... 1 s intervals until answered; the second copy
//	                 (and the first, with WithStaleSession) is preceded by 256 KiB of 0xff (see syncPadByte)
//	guest -> host   "\x00MACVM-READY1:<nonce>\n"  once per SYNC it scans
//	both            yamux from the next byte on; each side first skips repeats of the token
//	                 that started its session, and 0xff padding
//
// Each side discards everything else it reads before its token. Stream
// names travel as the first bytes of each stream: a big-endian uint16
// length and the name. Data frames are at most 256 KiB.
//
// On vsock every host connection is a new conn: the agent calls Accept on
// it and closes it when the session is Done (Accept never closes what it is
// given). On virtio-serial the port is one object for the VM's life and
// Accept is called on it again after each session.
package transport

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/hashicorp/yamux"
)

// ControlStream is the name of the stream that carries the agent's ttrpc
// service.
const ControlStream = "ttrpc"

// maxNameLen bounds a stream name so a corrupt header cannot make Accept
// allocate or wait for much.
const maxNameLen = 1024

// MaxFrameBody caps the body of the data frames this side sends (yamux
// would otherwise send up to a whole window in one frame). A receiver cut
// off in the middle of a frame then waits for at most this many bytes that
// will never come, which the sync padding (syncPadByte) can fill; see resendSync.
const MaxFrameBody = 256 << 10

// frameHeaderLen is the size of a yamux frame header.
const frameHeaderLen = 12

// headerTimeout bounds how long Accept waits for the name header of a
// stream the host has opened; Open writes it immediately.
const headerTimeout = 30 * time.Second

// Logger receives yamux's diagnostics; *log.Logger satisfies it.
type Logger interface {
	Print(v ...any)
	Printf(format string, v ...any)
	Println(v ...any)
}

type options struct {
	logger       Logger
	window       uint32
	writeTimeout time.Duration
	// staleSession makes Connect pad its first SYNC (WithStaleSession).
	staleSession bool
}

// Option tunes a session.
type Option func(*options)

// WithLogger sends yamux's diagnostics to l instead of discarding them.
func WithLogger(l Logger) Option { return func(o *options) { o.logger = l } }

// WithStreamWindow sets the per-stream receive window, which bounds both
// the throughput of one stream (window / round trip) and the memory a slow
// reader can pin on the receiving side. It is raised to yamux's 256 KiB
// minimum if smaller.
func WithStreamWindow(bytes uint32) Option { return func(o *options) { o.window = bytes } }

// WithWriteTimeout sets how long a write may wait for the channel before it
// fails. A TCG guest under load, or a paused VM, can stall for long.
func WithWriteTimeout(d time.Duration) Option { return func(o *options) { o.writeTimeout = d } }

// WithStaleSession tells Connect that the guest is most likely still
// serving an earlier host's session that ended without its knowing: a VM
// restored from a warm-start template, or handed over by the pool daemon,
// resumes with the agent inside the session of the template build or of
// the pool's warm-up. Connect then pads its first SYNC as it does the
// second (syncPadByte): the stale session reads the padding as a bad yamux
// header and ends, and the guest's next Accept finds the token behind it,
// instead of the first copy being lost to that session and the handshake
// waiting syncResendFirst for the second. The padding costs a guest that
// had no session only the scan of it. Only Connect looks at it.
func WithStaleSession() Option { return func(o *options) { o.staleSession = true } }

// DefaultStreamWindow is the per-stream receive window used unless
// WithStreamWindow says otherwise: large enough that a single stdout
// stream is not limited by round trips on a slow guest.
const DefaultStreamWindow = 8 << 20

// DefaultWriteTimeout is the write timeout used unless WithWriteTimeout
// says otherwise.
const DefaultWriteTimeout = 5 * time.Minute

func yamuxConfig(opts []Option) *yamux.Config {
	o := options{window: DefaultStreamWindow, writeTimeout: DefaultWriteTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	cfg := yamux.DefaultConfig()
	// TCG guests are slow and a paused VM answers nothing: a missed ping
	// must not kill the session. The host learns of a dead VM from the
	// hypervisor instead.
	cfg.EnableKeepAlive = false
	cfg.ConnectionWriteTimeout = o.writeTimeout
	cfg.MaxStreamWindowSize = max(o.window, 256<<10)
	// An unacknowledged open would otherwise tear the whole session down.
	cfg.StreamOpenTimeout = 0
	// A half-closed stream (stdin closed, output still flowing) may live as
	// long as its process; full Close is handled by streamConn.
	cfg.StreamCloseTimeout = 0
	cfg.LogOutput = nil
	cfg.Logger = o.logger
	if cfg.Logger == nil {
		cfg.LogOutput = io.Discard
	}
	return cfg
}

// Session is one yamux session over the raw channel.
type Session struct {
	mux  *yamux.Session
	raw  *rawConn
	done chan struct{}
}

func newSession(raw *rawConn, client bool, opts []Option) (*Session, error) {
	cfg := yamuxConfig(opts)
	var (
		mux *yamux.Session
		err error
	)
	if client {
		mux, err = yamux.Client(raw, cfg)
	} else {
		mux, err = yamux.Server(raw, cfg)
	}
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("%w: transport: %w", errdefs.ErrInvalidArgument, err)
	}
	s := &Session{mux: mux, raw: raw, done: make(chan struct{})}
	go func() {
		<-mux.CloseChan()
		// yamux closes the channel after it signals shutdown; Done waits
		// for that so a new Accept never races the old session's reads.
		<-raw.done
		close(s.done)
	}()
	return s, nil
}

// Open opens a stream named name (host side). It does not wait for the
// guest to accept it.
func (s *Session) Open(name string) (net.Conn, error) {
	if name == "" || len(name) > maxNameLen {
		return nil, fmt.Errorf("%w: transport: stream name %q must be 1..%d bytes", errdefs.ErrInvalidArgument, name, maxNameLen)
	}
	st, err := s.mux.OpenStream()
	if err != nil {
		return nil, s.err("open stream "+name, err)
	}
	hdr := make([]byte, 2+len(name))
	binary.BigEndian.PutUint16(hdr, uint16(len(name)))
	copy(hdr[2:], name)
	if _, err := st.Write(hdr); err != nil {
		st.Close()
		return nil, s.err("open stream "+name, err)
	}
	return newStreamConn(st, name), nil
}

// Accept returns the next stream the host opened, with its name (guest
// side). A stream whose header cannot be read is dropped.
func (s *Session) Accept() (name string, c net.Conn, err error) {
	for {
		st, err := s.mux.AcceptStream()
		if err != nil {
			return "", nil, s.err("accept", err)
		}
		name, err := readName(st)
		if err != nil {
			st.Close()
			continue
		}
		return name, newStreamConn(st, name), nil
	}
}

func readName(st *yamux.Stream) (string, error) {
	st.SetReadDeadline(time.Now().Add(headerTimeout))
	defer st.SetReadDeadline(time.Time{})
	var n [2]byte
	if _, err := io.ReadFull(st, n[:]); err != nil {
		return "", err
	}
	l := binary.BigEndian.Uint16(n[:])
	if l == 0 || l > maxNameLen {
		return "", fmt.Errorf("transport: bad stream name length %d", l)
	}
	name := make([]byte, l)
	if _, err := io.ReadFull(st, name); err != nil {
		return "", err
	}
	return string(name), nil
}

// Close ends the session and every stream in it. On the host it closes the
// channel; in the guest it only detaches from it.
func (s *Session) Close() error {
	err := s.mux.Close()
	<-s.done
	return err
}

// Done is closed when the session has ended, for whatever reason, and no
// longer touches the channel.
func (s *Session) Done() <-chan struct{} { return s.done }

// Stats counts the bytes the session has read from and written to the
// channel since the handshake (repeated tokens and padding excluded).
type Stats struct {
	Read, Written int64
}

// Stats reports the session's traffic, for diagnostics: a peer that has
// sent nothing since the handshake never processed this session's frames
// (each stream the host opens is acknowledged by the guest's yamux).
func (s *Session) Stats() Stats {
	return Stats{Read: s.raw.read.Load(), Written: s.raw.written.Load()}
}

// Ping measures a round trip through the peer's session, below any
// stream: an answer shows that the peer's session is alive and reading
// the channel, whatever its streams' servers do. It fails when ctx ends
// first (errdefs.ErrUnavailable wrapping ctx's error) or the session ends.
func (s *Session) Ping(ctx context.Context) (time.Duration, error) {
	type result struct {
		rtt time.Duration
		err error
	}
	done := make(chan result, 1)
	// yamux's Ping waits up to the write timeout or the session's end.
	go func() {
		rtt, err := s.mux.Ping()
		done <- result{rtt, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return 0, s.err("ping", r.err)
		}
		return r.rtt, nil
	case <-ctx.Done():
		return 0, fmt.Errorf("%w: transport: ping: %w", errdefs.ErrUnavailable, ctx.Err())
	}
}

// Err tells why a session that is Done ended, as far as the channel
// knows: the first error a read of it returned (io.EOF: the host went
// away; a token of another host: a new host connected; a deadline: Close
// interrupted it). nil means the channel read fine and the session ended
// of a protocol error (as a stale session does on the next host's padding)
// or of Close while no read was in flight.
func (s *Session) Err() error {
	if p := s.raw.readErr.Load(); p != nil {
		return *p
	}
	return nil
}

// NumStreams reports how many streams are open, for tests and diagnostics.
func (s *Session) NumStreams() int { return s.mux.NumStreams() }

// err reports a failed Open or Accept. Once the session is over, whatever
// the cause (yamux reports the channel's error, e.g. a reset), the error
// also wraps net.ErrClosed so that loops such as ttrpc's Serve stop.
func (s *Session) err(op string, err error) error {
	if s.mux.IsClosed() || errors.Is(err, yamux.ErrSessionShutdown) {
		return fmt.Errorf("%w: transport: %s: session ended (%v): %w", errdefs.ErrUnavailable, op, err, net.ErrClosed)
	}
	return fmt.Errorf("%w: transport: %s: %w", errdefs.ErrUnavailable, op, err)
}

// streamConn is a yamux stream with net.Conn semantics for Close: yamux's
// own Close only sends FIN (a half-close), which is what CloseWrite offers.
// Close also stops reading: later Reads fail with net.ErrClosed and what the
// peer still sends is discarded, so a peer writer never blocks on a window
// that nobody will reopen.
type streamConn struct {
	*yamux.Stream
	name string

	// readMu serialises Reads with the drain that Close starts, so that no
	// Read returns data once Close has returned and no byte is read twice.
	readMu sync.Mutex
	closed atomic.Bool
}

func newStreamConn(st *yamux.Stream, name string) *streamConn {
	return &streamConn{Stream: st, name: name}
}

// Name is the name the stream was opened with.
func (c *streamConn) Name() string { return c.name }

func (c *streamConn) Read(p []byte) (int, error) {
	// Checked before readMu too: the drain holds it until the peer closes.
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	n, err := c.Stream.Read(p)
	if err != nil && c.closed.Load() {
		return 0, net.ErrClosed
	}
	if err != nil && err != io.EOF {
		err = closedErr(err)
	}
	return n, err
}

// Write sends p in frames of at most MaxFrameBody bytes.
func (c *streamConn) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		w, err := c.Stream.Write(p[:min(len(p), MaxFrameBody)])
		n += w
		p = p[w:]
		if err != nil {
			return n, closedErr(err)
		}
	}
	return n, nil
}

// closedErr makes yamux's "this stream or session is over" errors match
// net.ErrClosed, which is what callers (ttrpc among them) check for.
func closedErr(err error) error {
	if errors.Is(err, yamux.ErrStreamClosed) || errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, yamux.ErrConnectionReset) {
		return fmt.Errorf("%w (%w)", net.ErrClosed, err)
	}
	return err
}

// CloseWrite half-closes the stream: the peer reads EOF once it has read
// everything written before, and this side can still read.
func (c *streamConn) CloseWrite() error {
	return c.Stream.Close()
}

// Close closes both directions.
func (c *streamConn) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	err := c.Stream.Close()
	// Wake a Read blocked in yamux; it sees closed and returns.
	c.Stream.SetReadDeadline(time.Now())
	go c.drain()
	return err
}

// drain discards what the peer still sends until it closes its side, which
// also lets yamux forget the stream.
func (c *streamConn) drain() {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	c.Stream.SetReadDeadline(time.Time{})
	io.Copy(io.Discard, c.Stream)
}
