package transport

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// choppyConn is the guest's end of a port that delivers what the host sent
// in reads of random size, now and then after a pause: virtio-serial hands
// the guest one buffer (at most a page) per read, and a TCG guest under
// load reads late. Deadlines reach the underlying conn.
type choppyConn struct {
	net.Conn

	mu  sync.Mutex // guards rnd
	rnd *rand.Rand
}

func (c *choppyConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	n := 1 + c.rnd.IntN(5000)
	var pause time.Duration
	if c.rnd.IntN(8) == 0 {
		pause = time.Duration(c.rnd.IntN(2000)) * time.Microsecond
	}
	c.mu.Unlock()
	time.Sleep(pause)
	return c.Conn.Read(p[:min(n, len(p))])
}

// staleState is what an earlier host leaves the guest's session in when it
// goes away unnoticed (a template build, a pool warm-up): the name says
// which frames it wrote last.
type staleState int

const (
	staleIdle          staleState = iota // nothing in flight: the template case
	staleMidBody                         // a data frame for an open stream, body cut short
	staleMidBodyNoStrm                   // the same for a stream the guest does not know
	staleControl                         // whole window update and ping frames
	staleBulk                            // a large stream write in flight
	numStaleStates
)

func (s staleState) String() string {
	return [...]string{"idle", "mid-body", "mid-body-unknown-stream", "control-frames", "bulk"}[s]
}

// frameHeader encodes a yamux header (version 0).
func frameHeader(typ uint8, flags uint16, stream, length uint32) []byte {
	h := make([]byte, frameHeaderLen)
	h[1] = typ
	binary.BigEndian.PutUint16(h[2:], flags)
	binary.BigEndian.PutUint32(h[4:], stream)
	binary.BigEndian.PutUint32(h[8:], length)
	return h
}

// leaveStale brings the first host's session into state st over h1 (raw
// bytes after the session's own) and returns once they are written.
func leaveStale(t *testing.T, rnd *rand.Rand, s1 *Session, h1 net.Conn, held <-chan struct{}, st staleState) {
	t.Helper()
	switch st {
	case staleIdle:
	case staleMidBody, staleMidBodyNoStrm:
		stream := uint32(99) // never opened
		if st == staleMidBody {
			c, err := s1.Open("held")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			<-held
			stream = 3 // the session's second stream (after the round trip's)
		}
		body := 1 + rnd.IntN(MaxFrameBody)
		sent := rnd.IntN(body)
		if _, err := h1.Write(append(frameHeader(0, 0, stream, uint32(body)), make([]byte, sent)...)); err != nil {
			t.Fatal(err)
		}
	case staleControl:
		var b []byte
		b = append(b, frameHeader(1, 0, 1, 4096)...)  // window update
		b = append(b, frameHeader(2, 1, 0, 7)...)     // ping SYN: the guest answers
		b = append(b, frameHeader(1, 0, 77, 4096)...) // window update, unknown stream
		if _, err := h1.Write(b); err != nil {
			t.Fatal(err)
		}
	case staleBulk:
		c, err := s1.Open("bulk")
		if err != nil {
			t.Fatal(err)
		}
		go c.Write(make([]byte, 1<<20)) // ends with the session
		time.Sleep(time.Duration(rnd.IntN(20)) * time.Millisecond)
	}
}

// A guest session left in any state by a host it never saw go, read in
// random pieces with random pauses, must give way to the next host's
// session (WithStaleSession), and that session must serve RPC-like
// traffic at once (two streams opened together, as the shim's first
// Reseed and SetTime are) and keep serving a while later: a session that
// died after the handshake would leave the host waiting for ever, which is
// what a clone that "connected and never answered" looks like.
func TestStaleSessionRandomized(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rnd := rand.New(rand.NewPCG(seed, 0))
	rounds := 24
	if testing.Short() {
		rounds = 8
	}
	for i := range rounds {
		st := staleState(i % int(numStaleStates))
		t.Run(fmt.Sprintf("%d-%s", i, st), func(t *testing.T) {
			port := newFakePort(t)
			guestEnd := &choppyConn{Conn: port.guest, rnd: rand.New(rand.NewPCG(rnd.Uint64(), 1))}
			held := make(chan struct{}, 1)
			sessions, stop := guestLoop(t, guestEnd, func(name string, c net.Conn) {
				if name == "held" || name == "bulk" {
					select {
					case held <- struct{}{}:
					default:
					}
					io.Copy(io.Discard, c)
					return
				}
				echo(name, c)
			})
			defer stop()

			h1 := port.connect(t)
			s1 := mustConnect(t, h1)
			roundTrip(t, s1, "warm-up", []byte("template"))
			leaveStale(t, rnd, s1, h1, held, st)
			s1.Close()

			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			s2, err := Connect(ctx, port.connect(t), WithStaleSession())
			if err != nil {
				t.Fatalf("stale %s: Connect: %v", st, err)
			}
			defer s2.Close()
			// Both streams are opened and written before either is read.
			names := []string{"reseed", "settime"}
			conns := make([]net.Conn, len(names))
			for i, name := range names {
				if conns[i], err = s2.Open(name); err != nil {
					t.Fatalf("stale %s: Open: %v", st, err)
				}
				conns[i].SetDeadline(time.Now().Add(time.Minute))
				if _, err := conns[i].Write([]byte(name)); err != nil {
					t.Fatalf("stale %s: write %s: %v", st, name, err)
				}
				conns[i].(interface{ CloseWrite() error }).CloseWrite()
			}
			for i, name := range names {
				got, err := io.ReadAll(conns[i])
				conns[i].Close()
				if err != nil || string(got) != name {
					t.Fatalf("stale %s: stream %s: got %q, %v; want the echo %q", st, name, got, err, name)
				}
			}
			time.Sleep(time.Duration(rnd.IntN(50)) * time.Millisecond)
			roundTrip(t, s2, "later", []byte("still served"))
			select {
			case <-s2.Done():
				t.Errorf("stale %s: the host's session ended", st)
			default:
			}
			// The guest accepted the first host's session and then one
			// more for ours; a third would mean ours died under it.
			if n := len(sessions); n != 2 {
				t.Fatalf("stale %s: guest accepted %d sessions, want 2", st, n)
			}
			// The stale one ended of the padding (a protocol error), not
			// of the channel: Err says so, and the agent logs nothing.
			stale := <-sessions
			<-stale.Done()
			if err := stale.Err(); err != nil {
				t.Errorf("stale %s: the stale session's Err = %v, want nil", st, err)
			}
		})
	}
}
