package transport

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// Listener is the guest's view of a session for a ttrpc server: it accepts
// every stream the host opens, returns those named ControlStream from
// Accept, and hands the others (stdio) to a StreamTable. Several control
// streams may come in one session; each is one ttrpc connection.
type Listener struct {
	conns  chan net.Conn
	closed chan struct{} // closed by Close
	once   sync.Once     // guards closing closed
	dead   chan struct{} // closed when the session stops yielding streams
	err    error         // why; written before dead is closed
}

// NewListener starts routing s's incoming streams. Streams that are not
// ControlStream go to table, or are closed if table is nil. Routing stops
// when the session ends; closing the listener does not end the session
// (stdio streams keep flowing to table) but closes further control streams.
func NewListener(s *Session, table *StreamTable) *Listener {
	l := &Listener{
		conns:  make(chan net.Conn),
		closed: make(chan struct{}),
		dead:   make(chan struct{}),
	}
	go l.route(s, table)
	return l
}

func (l *Listener) route(s *Session, table *StreamTable) {
	for {
		name, c, err := s.Accept()
		if err != nil {
			l.err = err
			close(l.dead)
			return
		}
		switch {
		case name == ControlStream:
			select {
			case l.conns <- c:
			case <-l.closed:
				c.Close()
			}
		case table != nil:
			table.Put(name, c)
		default:
			c.Close()
		}
	}
}

// Accept returns the next control stream. It fails with an error wrapping
// net.ErrClosed once the listener is closed or the session has ended.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, fmt.Errorf("transport: listener closed: %w", net.ErrClosed)
	case <-l.dead:
		return nil, l.err
	}
}

// Close stops Accept; it does not close the session.
func (l *Listener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

// Addr is a placeholder: the channel has no address.
func (l *Listener) Addr() net.Addr { return addr("macvm-transport") }

// StreamTable holds named stdio streams until the RPC that names them
// claims them: the host opens a process's streams before it sends the
// request, but the two travel independently, so either may arrive first.
type StreamTable struct {
	ttl time.Duration

	mu      sync.Mutex                // guards pending, waiters, closed
	pending map[string]*pendingStream // arrived, not yet claimed
	waiters map[string]chan net.Conn  // claimed, not yet arrived
	closed  bool
}

type pendingStream struct {
	conn  net.Conn
	timer *time.Timer // closes an unclaimed stream after ttl
}

// NewStreamTable returns an empty table. A stream nobody claims within ttl
// (for example because the RPC that named it failed) is closed and
// forgotten; ttl <= 0 keeps streams until Close.
func NewStreamTable(ttl time.Duration) *StreamTable {
	return &StreamTable{
		ttl:     ttl,
		pending: make(map[string]*pendingStream),
		waiters: make(map[string]chan net.Conn),
	}
}

// Put offers a stream. A waiter gets it at once; otherwise it is kept. A
// second unclaimed stream with the same name replaces the first, which is
// closed: names are chosen by the host and only the latest can be meant.
func (t *StreamTable) Put(name string, c net.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return
	}
	if ch, ok := t.waiters[name]; ok {
		delete(t.waiters, name)
		ch <- c // buffered; the waiter is the only receiver
		return
	}
	t.putLocked(name, c)
}

func (t *StreamTable) putLocked(name string, c net.Conn) {
	if old, ok := t.pending[name]; ok {
		old.stop()
		old.conn.Close()
	}
	p := &pendingStream{conn: c}
	if t.ttl > 0 {
		p.timer = time.AfterFunc(t.ttl, func() { t.expire(name, p) })
	}
	t.pending[name] = p
}

func (p *pendingStream) stop() {
	if p.timer != nil {
		p.timer.Stop()
	}
}

func (t *StreamTable) expire(name string, p *pendingStream) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.pending[name] == p {
		delete(t.pending, name)
		p.conn.Close()
	}
}

// Wait claims the stream called name, waiting for it to arrive until ctx
// ends. A name can be claimed once. It fails with ErrAlreadyExists if
// another Wait for the name is pending, with ErrUnavailable once the table
// is closed, and with ctx's error (errdefs.IsCanceled /
// IsDeadlineExceeded) on time-out; a stream that arrives after a timed-out
// Wait stays claimable until its ttl.
func (t *StreamTable) Wait(ctx context.Context, name string) (net.Conn, error) {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, fmt.Errorf("%w: transport: stream table closed", errdefs.ErrUnavailable)
	}
	if p, ok := t.pending[name]; ok {
		delete(t.pending, name)
		t.mu.Unlock()
		p.stop()
		return p.conn, nil
	}
	if _, ok := t.waiters[name]; ok {
		t.mu.Unlock()
		return nil, fmt.Errorf("%w: transport: stream %q already awaited", errdefs.ErrAlreadyExists, name)
	}
	ch := make(chan net.Conn, 1)
	t.waiters[name] = ch
	t.mu.Unlock()

	select {
	case c, ok := <-ch:
		if !ok {
			return nil, fmt.Errorf("%w: transport: stream table closed", errdefs.ErrUnavailable)
		}
		return c, nil
	case <-ctx.Done():
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.waiters[name] == ch {
		delete(t.waiters, name)
	} else if c, ok := <-ch; ok {
		// Put delivered while ctx ended: keep the stream for a retry.
		if t.closed {
			c.Close()
		} else {
			t.putLocked(name, c)
		}
	}
	return nil, fmt.Errorf("transport: waiting for stream %q: %w", name, ctx.Err())
}

// Close closes every unclaimed stream and fails pending and future Waits;
// streams Put afterwards are closed.
func (t *StreamTable) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	for name, p := range t.pending {
		p.stop()
		p.conn.Close()
		delete(t.pending, name)
	}
	for name, ch := range t.waiters {
		close(ch)
		delete(t.waiters, name)
	}
	return nil
}
