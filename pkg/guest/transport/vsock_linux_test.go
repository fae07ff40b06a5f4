package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// rawPair is a connected unix stream socketpair: the guest end wrapped as
// DialVsock wraps a vsock socket (fileConn), the host end as a net.Conn
// (what vz hands the host: a unix socket underneath).
func rawPair(t *testing.T) (guest, host net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	g, err := newFileConn(fds[0], "guest", vsockAddr{3, 1}, vsockAddr{2, 1024})
	if err != nil {
		t.Fatal(err)
	}
	hf := os.NewFile(uintptr(fds[1]), "host")
	defer hf.Close()
	h, err := net.FileConn(hf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(); h.Close() })
	return g, h
}

// TestRedialSessions runs the agent's pattern on the vsock code path: one
// channel, Accept called again after each session, the guest redialling
// after the host dropped the connection. Only the AF_VSOCK socket itself
// is replaced (by a socketpair); that part needs a Mac or a vsock host.
func TestRedialSessions(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hostConns := make(chan net.Conn, 4)
	var dials atomic.Int32
	dial := func() (net.Conn, error) {
		dials.Add(1)
		g, h := rawPair(t)
		hostConns <- h
		return g, nil
	}
	first, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	ch := newRedialChannel(dial, first)
	defer ch.Close()

	const rounds = 3
	guestErr := make(chan error, 1)
	go func() {
		for i := 0; i < rounds; i++ {
			sess, err := Accept(ctx, ch)
			if err != nil {
				guestErr <- fmt.Errorf("accept %d: %w", i, err)
				return
			}
			name, c, err := sess.Accept()
			if err != nil {
				guestErr <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			data, _ := io.ReadAll(c)
			fmt.Fprintf(c, "%s:%s", name, data)
			c.Close()
			<-sess.Done()
			sess.Close()
		}
		guestErr <- nil
	}()

	for i := 0; i < rounds; i++ {
		var hc net.Conn
		select {
		case hc = <-hostConns:
		case <-ctx.Done():
			t.Fatalf("round %d: the guest did not dial", i)
		}
		sess, err := Connect(ctx, hc)
		if err != nil {
			t.Fatalf("round %d: Connect: %v", i, err)
		}
		st, err := sess.Open(fmt.Sprintf("stdio-%d", i))
		if err != nil {
			t.Fatalf("round %d: Open: %v", i, err)
		}
		fmt.Fprintf(st, "hello %d", i)
		if err := st.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(st)
		if err != nil {
			t.Fatalf("round %d: read: %v", i, err)
		}
		if want := fmt.Sprintf("stdio-%d:hello %d", i, i); string(got) != want {
			t.Fatalf("round %d: got %q, want %q", i, got, want)
		}
		// The host goes away; the guest must see it and dial again.
		sess.Close()
	}
	if err := <-guestErr; err != nil {
		t.Fatal(err)
	}
	if n := dials.Load(); n < rounds {
		t.Errorf("%d dials for %d sessions", n, rounds)
	}
}

// TestRedialDeadline: while no host answers, a read waits with backoff
// and still honours its deadline; Close ends the wait.
func TestRedialDeadline(t *testing.T) {
	var dials atomic.Int32
	ch := newRedialChannel(func() (net.Conn, error) {
		dials.Add(1)
		return nil, fmt.Errorf("%w: no host", errdefs.ErrUnavailable)
	}, nil)
	ch.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	start := time.Now()
	_, err := ch.Read(make([]byte, 1))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read: %v, want a deadline error", err)
	}
	if d := time.Since(start); d < 100*time.Millisecond || d > 2*time.Second {
		t.Errorf("Read returned after %s, want about 150ms", d)
	}
	if n := dials.Load(); n < 2 {
		t.Errorf("%d dials in 150ms, want retries", n)
	}

	ch.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := ch.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	// A deadline set meanwhile cuts the backoff wait short.
	ch.SetReadDeadline(time.Now())
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read after SetReadDeadline(now): %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("SetReadDeadline did not wake the redial wait")
	}
	ch.SetReadDeadline(time.Time{})
	go func() {
		_, err := ch.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	ch.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Read after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not wake the redial wait")
	}
}

// TestRedialEOFOnce: a lost connection reads as io.EOF once, then the
// next read is served by a new connection.
func TestRedialEOFOnce(t *testing.T) {
	g1, h1 := rawPair(t)
	g2, h2 := rawPair(t)
	next := make(chan net.Conn, 1)
	next <- g2
	ch := newRedialChannel(func() (net.Conn, error) {
		select {
		case c := <-next:
			return c, nil
		default:
			return nil, errors.New("no more")
		}
	}, g1)
	h1.Write([]byte("a"))
	h1.Close()
	buf := make([]byte, 8)
	if n, err := ch.Read(buf); n != 1 || err != nil {
		t.Fatalf("first read: %d %v", n, err)
	}
	if _, err := ch.Read(buf); err != io.EOF {
		t.Fatalf("read after the host left: %v, want io.EOF", err)
	}
	h2.Write([]byte("b"))
	if n, err := ch.Read(buf); n != 1 || err != nil || buf[0] != 'b' {
		t.Fatalf("read on the new connection: %d %v %q", n, err, buf[:n])
	}
	if _, err := ch.Write([]byte("c")); err != nil {
		t.Fatal(err)
	}
	h2.SetReadDeadline(time.Now().Add(time.Second))
	if n, err := h2.Read(buf); n != 1 || buf[0] != 'c' {
		t.Fatalf("host read %q %v", buf[:n], err)
	}
}

// TestFileConnCloseWrite: the half-close the stdio streams rely on works
// on the wrapper DialVsock returns.
func TestFileConnCloseWrite(t *testing.T) {
	g, h := rawPair(t)
	if _, err := g.Write([]byte("out")); err != nil {
		t.Fatal(err)
	}
	if err := g.(*fileConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(h)
	if err != nil || !bytes.Equal(got, []byte("out")) {
		t.Fatalf("host read %q %v", got, err)
	}
	// Reading still works after the half-close.
	h.Write([]byte("in"))
	buf := make([]byte, 2)
	g.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadFull(g, buf); err != nil || string(buf) != "in" {
		t.Fatalf("guest read %q %v", buf, err)
	}
	if g.RemoteAddr().String() != "2:1024" || g.RemoteAddr().Network() != "vsock" {
		t.Errorf("remote addr %s/%s", g.RemoteAddr().Network(), g.RemoteAddr())
	}
}

// TestVsockErrorKinds: a failed dial says whether the transport is missing
// (the virtio vsock driver is not up yet) or nobody listens, both of which
// the agent retries. The real AF_VSOCK connect is not exercised here: this
// machine's only vsock transport belongs to the machine's own hypervisor,
// which is not ours to dial.
func TestVsockErrorKinds(t *testing.T) {
	for _, tt := range []struct {
		errno error
		want  error
	}{
		{unix.ENODEV, errdefs.ErrNotFound},
		{unix.EAFNOSUPPORT, errdefs.ErrNotFound},
		{unix.ECONNREFUSED, errdefs.ErrUnavailable},
		{unix.ECONNRESET, errdefs.ErrUnavailable},
		{unix.ETIMEDOUT, errdefs.ErrUnavailable},
	} {
		if got := vsockDialError(tt.errno); !errors.Is(got, tt.want) || !errors.Is(got, tt.errno) {
			t.Errorf("%v: got %v, want %v wrapping the errno", tt.errno, got, tt.want)
		}
	}
}
