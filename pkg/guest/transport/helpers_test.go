package transport

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/macvm/macvm/internal/testutil"
)

// fakePort imitates a virtio-serial port and its host chardev socket: the
// guest end lives as long as the port; hosts come and go through connect.
// Bytes the guest writes while no host is connected wait and go to the
// next host, and bytes a host sent that the guest has not read yet stay
// readable after that host has left, as on the real device.
type fakePort struct {
	guest net.Conn // the agent's side, handed to Accept
	relay net.Conn // the device's side of guest

	mu   sync.Mutex // guards host, done, relayed
	cond *sync.Cond // signalled when host changes
	host net.Conn   // the device's end of the current host's socket, or nil
	done bool
	// relayed is closed once everything the last host sent has been
	// passed on to the guest: the chardev takes one client at a time, so
	// a new host's bytes never overtake an old one's.
	relayed chan struct{}
}

func newFakePort(t testing.TB) *fakePort {
	g, r := testutil.Socketpair(t)
	p := &fakePort{guest: g, relay: r}
	p.cond = sync.NewCond(&p.mu)
	go p.toHost()
	t.Cleanup(func() {
		p.mu.Lock()
		p.done = true
		p.cond.Broadcast()
		p.mu.Unlock()
	})
	return p
}

// toHost carries guest writes to whichever host is connected, keeping a
// chunk that could not be delivered for the next one.
func (p *fakePort) toHost() {
	buf := make([]byte, 64<<10)
	for {
		n, err := p.relay.Read(buf)
		if err != nil {
			return
		}
		chunk := buf[:n]
		for len(chunk) > 0 {
			p.mu.Lock()
			for p.host == nil && !p.done {
				p.cond.Wait()
			}
			h, done := p.host, p.done
			p.mu.Unlock()
			if done {
				return
			}
			w, err := h.Write(chunk)
			chunk = chunk[w:]
			if err != nil {
				p.mu.Lock()
				if p.host == h {
					p.host = nil
				}
				p.mu.Unlock()
			}
		}
	}
}

// connect plugs in a new host, returning its socket. The previous host, if
// any, must have disconnected (the chardev accepts one client).
func (p *fakePort) connect(t testing.TB) net.Conn {
	hostEnd, dev := testutil.Socketpair(t)
	p.mu.Lock()
	prev := p.relayed
	relayed := make(chan struct{})
	p.relayed = relayed
	p.mu.Unlock()
	if prev != nil {
		<-prev
	}
	p.mu.Lock()
	p.host = dev
	p.cond.Broadcast()
	p.mu.Unlock()
	go func() {
		defer close(relayed)
		io.Copy(p.relay, dev)
		p.mu.Lock()
		if p.host == dev {
			p.host = nil
		}
		p.mu.Unlock()
	}()
	return hostEnd
}

// guestLoop is what the agent does: Accept sessions on rw forever and hand
// each accepted stream to handle. It returns a function that stops it.
func guestLoop(t testing.TB, rw io.ReadWriter, handle func(name string, c net.Conn)) (sessions <-chan *Session, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan *Session, 16)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			s, err := Accept(ctx, rw)
			if err != nil {
				if ctx.Err() == nil {
					time.Sleep(10 * time.Millisecond)
				}
				continue
			}
			select {
			case ch <- s:
			default:
			}
			go func() {
				<-ctx.Done()
				s.Close()
			}()
			for {
				name, c, err := s.Accept()
				if err != nil {
					break
				}
				go handle(name, c)
			}
			<-s.Done()
		}
	}()
	return ch, func() {
		cancel()
		<-done
	}
}

// echo copies what it reads back to the writer, then half-closes.
func echo(_ string, c net.Conn) {
	io.Copy(c, c)
	c.(interface{ CloseWrite() error }).CloseWrite()
	c.Close()
}

func mustConnect(t testing.TB, conn net.Conn) *Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Connect(ctx, conn)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// roundTrip sends msg on a new stream to an echoing guest and checks that
// it comes back, followed by EOF.
func roundTrip(t testing.TB, s *Session, name string, msg []byte) {
	t.Helper()
	c, err := s.Open(name)
	if err != nil {
		t.Fatalf("Open(%q): %v", name, err)
	}
	got := testutil.Exchange(t, c, msg, 10*time.Second)
	if string(got) != string(msg) {
		t.Fatalf("stream %q: got %d bytes %q, want %d bytes %q", name, len(got), trunc(got), len(msg), trunc(msg))
	}
}

func trunc(b []byte) []byte {
	if len(b) > 40 {
		return b[:40]
	}
	return b
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
