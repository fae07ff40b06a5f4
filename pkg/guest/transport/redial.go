package transport

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Redial backoff bounds: a host that is not listening (yet, or any more)
// is retried quickly at first, then once a second.
const (
	redialMinBackoff = 10 * time.Millisecond
	redialMaxBackoff = time.Second
)

// redialChannel is the guest's channel when the guest dials the host (vsock
// under Virtualization.framework). Each host connection is one session, but
// the agent's serve loop calls Accept again and again on one channel, as it
// does on virtio-serial; so this channel behaves like the serial port: a
// lost connection is reported as io.EOF once (the session over it ends),
// and the next read dials the host again, waiting (with backoff, bounded by
// the read deadline) until it answers. SetDeadline reaches the current
// connection and any wait for the next one, which is how Accept and
// Session.Close interrupt it.
type redialChannel struct {
	dial func() (net.Conn, error)

	dialMu sync.Mutex // serialises dials, so one connection is made at a time

	mu sync.Mutex // guards the fields below
	// conn is the current host connection, nil between a loss and the
	// next successful dial.
	conn                        net.Conn
	readDeadline, writeDeadline time.Time
	closed                      bool
	// wake is closed (and replaced) when a deadline changes or the channel
	// closes, to cut a backoff wait short.
	wake chan struct{}
}

var _ io.ReadWriteCloser = (*redialChannel)(nil)

// newRedialChannel starts with first (which may be nil) and gets later
// connections from dial, one attempt per call.
func newRedialChannel(dial func() (net.Conn, error), first net.Conn) *redialChannel {
	return &redialChannel{dial: dial, conn: first, wake: make(chan struct{})}
}

func (r *redialChannel) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	for {
		c, err := r.current(true)
		if err != nil {
			return 0, err
		}
		n, err := c.Read(b)
		if n > 0 {
			return n, nil
		}
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return 0, err
		}
		// EOF or a reset: this host connection is over.
		r.drop(c)
		return 0, io.EOF
	}
}

func (r *redialChannel) Write(b []byte) (int, error) {
	c, err := r.current(false)
	if err != nil {
		return 0, err
	}
	n, err := c.Write(b)
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		r.drop(c)
	}
	return n, err
}

// current returns the live connection, dialling until one is made, the
// relevant deadline passes, or the channel is closed.
func (r *redialChannel) current(read bool) (net.Conn, error) {
	backoff := redialMinBackoff
	for {
		r.mu.Lock()
		c, closed, wake := r.conn, r.closed, r.wake
		deadline := r.writeDeadline
		if read {
			deadline = r.readDeadline
		}
		r.mu.Unlock()
		switch {
		case closed:
			return nil, fmt.Errorf("transport: channel closed: %w", net.ErrClosed)
		case c != nil:
			return c, nil
		case !deadline.IsZero() && !time.Now().Before(deadline):
			return nil, os.ErrDeadlineExceeded
		}
		if c, err := r.redial(); err != nil || c != nil {
			return c, err
		}
		wait := backoff
		if !deadline.IsZero() {
			wait = min(wait, time.Until(deadline))
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-wake:
		}
		t.Stop()
		backoff = min(2*backoff, redialMaxBackoff)
	}
}

// redial makes one dial attempt unless another caller has connected
// meanwhile. It returns (nil, nil) when the attempt failed and the caller
// should back off.
func (r *redialChannel) redial() (net.Conn, error) {
	r.dialMu.Lock()
	defer r.dialMu.Unlock()
	r.mu.Lock()
	if c, closed := r.conn, r.closed; c != nil || closed {
		r.mu.Unlock()
		if closed {
			return nil, fmt.Errorf("transport: channel closed: %w", net.ErrClosed)
		}
		return c, nil
	}
	r.mu.Unlock()
	c, err := r.dial()
	if err != nil {
		return nil, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		c.Close()
		return nil, fmt.Errorf("transport: channel closed: %w", net.ErrClosed)
	}
	c.SetReadDeadline(r.readDeadline)
	c.SetWriteDeadline(r.writeDeadline)
	r.conn = c
	return c, nil
}

// drop closes c if it is still the current connection.
func (r *redialChannel) drop(c net.Conn) {
	r.mu.Lock()
	if r.conn == c {
		r.conn = nil
	}
	r.mu.Unlock()
	c.Close()
}

// Close closes the current connection and stops redialling.
func (r *redialChannel) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	close(r.wake)
	if r.conn != nil {
		return r.conn.Close()
	}
	return nil
}

func (r *redialChannel) SetDeadline(t time.Time) error {
	r.setDeadlines(&t, &t)
	return nil
}

func (r *redialChannel) SetReadDeadline(t time.Time) error {
	r.setDeadlines(&t, nil)
	return nil
}

func (r *redialChannel) SetWriteDeadline(t time.Time) error {
	r.setDeadlines(nil, &t)
	return nil
}

func (r *redialChannel) setDeadlines(rd, wd *time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if rd != nil {
		r.readDeadline = *rd
		if r.conn != nil {
			r.conn.SetReadDeadline(*rd)
		}
	}
	if wd != nil {
		r.writeDeadline = *wd
		if r.conn != nil {
			r.conn.SetWriteDeadline(*wd)
		}
	}
	if !r.closed {
		close(r.wake)
		r.wake = make(chan struct{})
	}
}
