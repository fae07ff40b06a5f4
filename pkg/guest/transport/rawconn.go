package transport

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// rawConn is the channel as one yamux session sees it. Reads go through the
// handshake's bufio.Reader, which may already hold the first yamux bytes.
// Closing it detaches the session from the channel: on the host the net.Conn
// is closed; on the guest the port is kept for the next Accept, so blocked
// I/O is interrupted with a deadline instead, and Close returns only once no
// read or write of this session is still in flight, so that none can steal
// bytes from the next session.
type rawConn struct {
	r  *bufio.Reader
	w  io.Writer
	rw any // for deadlines; the channel itself
	// closer is closed by Close; nil on the guest, where the port outlives
	// the session.
	closer io.Closer
	// skipKind and skipNonce, until the first yamux byte, name the token
	// of which repeats may still follow the one that started the session.
	// Only the session's single reader goroutine touches them.
	skipKind, skipNonce string

	mu       sync.Mutex // guards closed and inflight
	idle     *sync.Cond // signalled when inflight drops to zero
	closed   bool
	inflight int
	done     chan struct{} // closed when Close has detached the channel

	// read and written count the session's bytes (after the handshake's)
	// for Session.Stats.
	read, written atomic.Int64
	// readErr is the first error a read of the channel (or the check
	// of repeated tokens) returned, for Session.Err.
	readErr atomic.Pointer[error]
}

func newRawConn(r *bufio.Reader, rw io.Writer, closer io.Closer, skipKind, skipNonce string) *rawConn {
	c := &rawConn{r: r, w: rw, rw: rw, closer: closer, skipKind: skipKind, skipNonce: skipNonce, done: make(chan struct{})}
	c.idle = sync.NewCond(&c.mu)
	return c
}

func (c *rawConn) begin() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.inflight++
	return true
}

func (c *rawConn) end() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inflight--
	if c.inflight == 0 {
		c.idle.Broadcast()
	}
}

func (c *rawConn) Read(p []byte) (int, error) {
	if !c.begin() {
		return 0, net.ErrClosed
	}
	defer c.end()
	if c.skipNonce != "" {
		if err := c.skipSyncs(); err != nil {
			c.readErr.CompareAndSwap(nil, &err)
			return 0, err
		}
	}
	n, err := c.r.Read(p)
	c.read.Add(int64(n))
	if err != nil {
		c.readErr.CompareAndSwap(nil, &err)
	}
	return n, err
}

// skipSyncs drops what the peer sent after the answered token and before
// its first yamux byte: on the guest, the copies of the SYNC (and their
// padding) that the host resent before it saw READY; on the host, a
// repeated READY. Any other token means a different host has connected
// since: the session is over.
func (c *rawConn) skipSyncs() error {
	for {
		b, err := c.r.Peek(1)
		if err != nil {
			return err
		}
		if b[0] == syncPadByte {
			run, _ := c.r.Peek(c.r.Buffered())
			n := 0
			for n < len(run) && run[n] == syncPadByte {
				n++
			}
			c.r.Discard(n)
			continue
		}
		if b[0] != tokenPrefix[0] {
			break
		}
		// A yamux header is 12 bytes, so a second byte will come.
		if b, err = c.r.Peek(2); err != nil {
			return err
		}
		if b[1] != tokenPrefix[1] {
			break
		}
		kind, nonce, err := readToken(c.r)
		if err != nil {
			return err
		}
		if kind != c.skipKind || nonce != c.skipNonce {
			return fmt.Errorf("transport: %s token with nonce %s during session %s: a new host connected", kind, nonce, c.skipNonce)
		}
	}
	c.skipNonce = ""
	return nil
}

func (c *rawConn) Write(p []byte) (int, error) {
	if !c.begin() {
		return 0, net.ErrClosed
	}
	defer c.end()
	n, err := c.w.Write(p)
	c.written.Add(int64(n))
	return n, err
}

// Close is called by yamux exactly once per session, when it shuts down.
func (c *rawConn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		<-c.done
		return nil
	}
	c.closed = true
	c.mu.Unlock()

	var err error
	if c.closer != nil {
		err = c.closer.Close()
	} else {
		err = setDeadline(c.rw, time.Now())
	}
	c.mu.Lock()
	for c.inflight > 0 {
		c.idle.Wait()
	}
	c.mu.Unlock()
	close(c.done)
	return err
}

// LocalAddr and RemoteAddr let yamux streams report the channel's addresses
// when it has them.
func (c *rawConn) LocalAddr() net.Addr {
	if a, ok := c.rw.(interface{ LocalAddr() net.Addr }); ok {
		return a.LocalAddr()
	}
	return addr("macvm-transport")
}

func (c *rawConn) RemoteAddr() net.Addr {
	if a, ok := c.rw.(interface{ RemoteAddr() net.Addr }); ok {
		return a.RemoteAddr()
	}
	return addr("macvm-transport")
}

// addr is a net.Addr for channels and listeners that have no address.
type addr string

func (a addr) Network() string { return "macvm" }
func (a addr) String() string  { return string(a) }
