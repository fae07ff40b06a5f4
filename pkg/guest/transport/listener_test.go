package transport

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/internal/testutil"
)

func TestListenerRoutesStreams(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	accepted := make(chan *Session, 1)
	go func() {
		s, err := Accept(context.Background(), guest)
		if err != nil {
			t.Error(err)
		}
		accepted <- s
	}()
	hs := mustConnect(t, host)
	gs := <-accepted
	defer gs.Close()
	table := NewStreamTable(0)
	defer table.Close()
	l := NewListener(gs, table)
	defer l.Close()

	open := func(name, payload string) {
		c, err := hs.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(payload))
		c.(interface{ CloseWrite() error }).CloseWrite()
	}
	open("stdout-1", "one")
	open(ControlStream, "rpc")
	open("stdout-2", "two")

	c, err := l.Accept()
	if err != nil {
		t.Fatalf("listener Accept: %v", err)
	}
	if got := readAll(t, c); got != "rpc" {
		t.Errorf("control stream carried %q, want %q", got, "rpc")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, tc := range []struct{ name, want string }{{"stdout-2", "two"}, {"stdout-1", "one"}} {
		c, err := table.Wait(ctx, tc.name)
		if err != nil {
			t.Fatalf("Wait(%q): %v", tc.name, err)
		}
		if got := readAll(t, c); got != tc.want {
			t.Errorf("stream %q carried %q, want %q", tc.name, got, tc.want)
		}
	}

	// When the session ends, Accept fails with net.ErrClosed.
	hs.Close()
	done := make(chan error, 1)
	go func() {
		_, err := l.Accept()
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after the session ended = %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept did not return after the session ended")
	}
}

func TestListenerClose(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	accepted := make(chan *Session, 1)
	go func() {
		s, _ := Accept(context.Background(), guest)
		accepted <- s
	}()
	mustConnect(t, host)
	gs := <-accepted
	defer gs.Close()
	l := NewListener(gs, nil)
	l.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
	}
	select {
	case <-gs.Done():
		t.Error("closing the listener ended the session")
	default:
	}
}

func readAll(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

// fakeConn is a net.Conn that records whether it was closed.
type fakeConn struct {
	net.Conn
	closed chan struct{}
}

func newFakeConn() *fakeConn { return &fakeConn{closed: make(chan struct{})} }

func (c *fakeConn) Close() error {
	select {
	case <-c.closed:
	default:
		close(c.closed)
	}
	return nil
}

func (c *fakeConn) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

func TestStreamTable(t *testing.T) {
	ctx := context.Background()

	t.Run("put before wait", func(t *testing.T) {
		tab := NewStreamTable(0)
		c := newFakeConn()
		tab.Put("a", c)
		got, err := tab.Wait(ctx, "a")
		if err != nil || got != c {
			t.Fatalf("Wait = %v, %v; want the stream put", got, err)
		}
		short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		defer cancel()
		if _, err := tab.Wait(short, "a"); !errdefs.IsDeadlineExceeded(err) {
			t.Errorf("second Wait for a claimed name = %v, want DeadlineExceeded", err)
		}
	})

	t.Run("wait before put", func(t *testing.T) {
		tab := NewStreamTable(0)
		c := newFakeConn()
		res := make(chan net.Conn, 1)
		go func() {
			got, err := tab.Wait(ctx, "b")
			if err != nil {
				t.Error(err)
			}
			res <- got
		}()
		time.Sleep(20 * time.Millisecond)
		tab.Put("b", c)
		if got := <-res; got != c {
			t.Errorf("Wait returned %v, want the stream put", got)
		}
	})

	t.Run("second waiter", func(t *testing.T) {
		tab := NewStreamTable(0)
		wctx, cancel := context.WithCancel(ctx)
		go tab.Wait(wctx, "c")
		defer cancel()
		time.Sleep(20 * time.Millisecond)
		if _, err := tab.Wait(ctx, "c"); !errdefs.IsAlreadyExists(err) {
			t.Errorf("second concurrent Wait = %v, want ErrAlreadyExists", err)
		}
	})

	t.Run("late arrival after timeout stays claimable", func(t *testing.T) {
		tab := NewStreamTable(0)
		short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		defer cancel()
		if _, err := tab.Wait(short, "d"); !errdefs.IsDeadlineExceeded(err) {
			t.Fatalf("Wait = %v, want DeadlineExceeded", err)
		}
		c := newFakeConn()
		tab.Put("d", c)
		if got, err := tab.Wait(ctx, "d"); err != nil || got != c {
			t.Errorf("retry Wait = %v, %v; want the late stream", got, err)
		}
	})

	t.Run("duplicate replaces and closes", func(t *testing.T) {
		tab := NewStreamTable(0)
		old, newer := newFakeConn(), newFakeConn()
		tab.Put("e", old)
		tab.Put("e", newer)
		if !old.isClosed() {
			t.Error("replaced stream not closed")
		}
		if got, _ := tab.Wait(ctx, "e"); got != newer {
			t.Error("Wait did not return the newer stream")
		}
	})

	t.Run("ttl expires unclaimed", func(t *testing.T) {
		tab := NewStreamTable(30 * time.Millisecond)
		c := newFakeConn()
		tab.Put("f", c)
		select {
		case <-c.closed:
		case <-time.After(5 * time.Second):
			t.Fatal("unclaimed stream not closed after its ttl")
		}
		short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		defer cancel()
		if _, err := tab.Wait(short, "f"); !errdefs.IsDeadlineExceeded(err) {
			t.Errorf("Wait for an expired stream = %v, want DeadlineExceeded", err)
		}
	})

	t.Run("claimed before ttl is not closed", func(t *testing.T) {
		tab := NewStreamTable(30 * time.Millisecond)
		c := newFakeConn()
		tab.Put("g", c)
		if _, err := tab.Wait(ctx, "g"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(60 * time.Millisecond)
		if c.isClosed() {
			t.Error("claimed stream closed by its ttl")
		}
	})

	t.Run("close", func(t *testing.T) {
		tab := NewStreamTable(0)
		pending := newFakeConn()
		tab.Put("h", pending)
		waitErr := make(chan error, 1)
		go func() {
			_, err := tab.Wait(ctx, "i")
			waitErr <- err
		}()
		time.Sleep(20 * time.Millisecond)
		tab.Close()
		if !pending.isClosed() {
			t.Error("pending stream not closed by Close")
		}
		if err := <-waitErr; !errdefs.IsUnavailable(err) {
			t.Errorf("Wait pending at Close = %v, want ErrUnavailable", err)
		}
		late := newFakeConn()
		tab.Put("j", late)
		if !late.isClosed() {
			t.Error("stream put after Close not closed")
		}
		if _, err := tab.Wait(ctx, "j"); !errdefs.IsUnavailable(err) {
			t.Errorf("Wait after Close = %v, want ErrUnavailable", err)
		}
	})
}
