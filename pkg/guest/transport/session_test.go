package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/internal/testutil"
)

// syncPadding is what resendSync puts before a padded SYNC copy.
var syncPadding = bytes.Repeat([]byte{syncPadByte}, syncPadLen)

func TestConnectAccept(t *testing.T) {
	for _, tc := range []struct {
		name string
		pair func(testing.TB) (net.Conn, net.Conn)
	}{
		{"socketpair", testutil.Socketpair},
		{"net.Pipe", func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, guest := tc.pair(t)
			names := make(chan string, 4)
			_, stop := guestLoop(t, guest, func(name string, c net.Conn) {
				names <- name
				echo(name, c)
			})
			defer stop()
			s := mustConnect(t, host)
			roundTrip(t, s, "ttrpc", []byte("hello"))
			roundTrip(t, s, "exec-1-stdout", []byte("world"))
			for _, want := range []string{"ttrpc", "exec-1-stdout"} {
				if got := <-names; got != want {
					t.Errorf("guest accepted stream %q, want %q", got, want)
				}
			}
		})
	}
}

func TestReadToken(t *testing.T) {
	const n1, n2 = "0123456789abcdef", "fedcba9876543210"
	for _, tc := range []struct {
		name      string
		in        string
		wantKind  string
		wantNonce string
	}{
		{"bare", "\x00MACVM-SYNC1:" + n1 + "\n", kindSync, n1},
		{"after garbage", "junk\x00\x01\x00\x00\x02\x00\x00\x00\x05hello\x00MACVM-READY1:" + n1 + "\n", kindReady, n1},
		{"truncated token first", "\x00MACVM-SYN\x00MACVM-SYNC1:" + n2 + "\n", kindSync, n2},
		{"truncated inside body", "\x00MACVM-SYNC1:0123\x00MACVM-SYNC1:" + n2 + "\n", kindSync, n2},
		{"doubled NUL", "\x00\x00MACVM-READY1:" + n2 + "\n", kindReady, n2},
		{"uppercase nonce rejected", "\x00MACVM-SYNC1:0123456789ABCDEF\n\x00MACVM-SYNC1:" + n1 + "\n", kindSync, n1},
		{"short nonce rejected", "\x00MACVM-SYNC1:0123\n\x00MACVM-READY1:" + n1 + "\n", kindReady, n1},
		{"unknown kind rejected", "\x00MACVM-HELLO1:" + n2 + "\n\x00MACVM-SYNC1:" + n1 + "\n", kindSync, n1},
		{"overlong body rejected", "\x00MACVM-SYNC1:" + n2 + n2 + "\n\x00MACVM-SYNC1:" + n1 + "\n", kindSync, n1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, nonce, err := readToken(bufio.NewReader(strings.NewReader(tc.in)))
			if err != nil {
				t.Fatalf("readToken: %v", err)
			}
			if kind != tc.wantKind || nonce != tc.wantNonce {
				t.Errorf("readToken = %q, %q; want %q, %q", kind, nonce, tc.wantKind, tc.wantNonce)
			}
		})
	}
	if _, _, err := readToken(bufio.NewReader(strings.NewReader("\x00MACVM-SYNC1:" + n1))); err != io.EOF {
		t.Errorf("readToken on a token cut by EOF: err = %v, want io.EOF", err)
	}
}

// Both sides have leftovers from an earlier session in the channel: the
// handshake must skip them, including a stale READY for another nonce and
// a stale, answerable SYNC from a host that went away.
func TestStaleBytesBothSides(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	staleForHost := "\x00\x00\x00\x00\x01garbage\x00MACVM-READY1:00000000deadbeef\n\x00MACVM-REA"
	staleForGuest := "\x00\x01\x00\x02\x00\x00\x00\x01\x00\x00\x00\x00yamux?\x00MACVM-SYNC1:00000000deadbeef\n\x00MACV"
	if _, err := guest.Write([]byte(staleForHost)); err != nil {
		t.Fatal(err)
	}
	if _, err := host.Write([]byte(staleForGuest)); err != nil {
		t.Fatal(err)
	}
	sessions, stop := guestLoop(t, guest, echo)
	defer stop()
	s := mustConnect(t, host)
	roundTrip(t, s, "a", []byte("after stale bytes"))
	// The guest answered the stale SYNC first; that session died on the
	// real host's SYNC and a second one, after the host's resend, serves us.
	if n := len(sessions); n != 2 {
		t.Errorf("guest accepted %d sessions, want 2", n)
	}
}

// The host goes away and a new one connects to the same port, with bytes
// of the old session still queued in both directions.
func TestHostReconnect(t *testing.T) {
	port := newFakePort(t)
	_, stop := guestLoop(t, port.guest, echo)
	defer stop()

	h1 := port.connect(t)
	s1 := mustConnect(t, h1)
	roundTrip(t, s1, "first", []byte("one"))
	// Leave a stream half-used so frames are in flight when the host dies.
	c, err := s1.Open("abandoned")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(bytes.Repeat([]byte("x"), 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(); err != nil {
		t.Fatalf("close first session: %v", err)
	}

	for i := range 3 {
		h := port.connect(t)
		s := mustConnect(t, h)
		roundTrip(t, s, fmt.Sprintf("reconnect-%d", i), []byte("again"))
		s.Close()
	}
}

func TestConcurrentStreams(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	_, stop := guestLoop(t, guest, echo)
	defer stop()
	s := mustConnect(t, host)

	const streams = 100
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := make([]byte, 64<<10+i)
			rand.NewChaCha8([32]byte{byte(i)}).Read(msg)
			c, err := s.Open(fmt.Sprintf("stream-%d", i))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			go func() {
				c.Write(msg)
				c.(interface{ CloseWrite() error }).CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
				return
			}
			if !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("stream %d: got %d bytes back, want %d identical bytes", i, len(got), len(msg))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestLargeTransferChecksum(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	const size = 64 << 20
	sums := make(chan string, 1)
	_, stop := guestLoop(t, guest, func(_ string, c net.Conn) {
		defer c.Close()
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err != nil || n != size {
			sums <- fmt.Sprintf("read %d bytes, err %v", n, err)
			return
		}
		sums <- hex.EncodeToString(h.Sum(nil))
	})
	defer stop()
	s := mustConnect(t, host)

	c, err := s.Open("big")
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(rand.NewChaCha8([32]byte{1}), size), h)
	if n, err := io.Copy(c, src); err != nil || n != size {
		t.Fatalf("wrote %d bytes, err %v", n, err)
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	want := hex.EncodeToString(h.Sum(nil))
	select {
	case got := <-sums:
		if got != want {
			t.Errorf("guest sha256 = %s, want %s", got, want)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("guest did not finish reading")
	}
}

func TestHalfClose(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	// The guest reads the whole request, then answers on the same stream:
	// only possible if the host's CloseWrite left the other direction open.
	_, stop := guestLoop(t, guest, func(_ string, c net.Conn) {
		defer c.Close()
		req, err := io.ReadAll(c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "got %d bytes: %s", len(req), req)
	})
	defer stop()
	s := mustConnect(t, host)

	c, err := s.Open("half")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	if _, err := c.Write([]byte("more")); err == nil {
		t.Error("Write after CloseWrite succeeded, want an error")
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read after CloseWrite: %v", err)
	}
	if want := "got 4 bytes: ping"; string(got) != want {
		t.Errorf("reply = %q, want %q", got, want)
	}
}

func TestCloseBothDirections(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	peer := make(chan net.Conn, 1)
	_, stop := guestLoop(t, guest, func(_ string, c net.Conn) { peer <- c })
	defer stop()
	s := mustConnect(t, host)

	c, err := s.Open("closing")
	if err != nil {
		t.Fatal(err)
	}
	g := <-peer
	defer g.Close()

	// A Read blocked at Close time must return.
	readErr := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		readErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("blocked Read returned %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read blocked at Close did not return")
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after Close = %v, want net.ErrClosed", err)
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Error("Write after Close succeeded, want an error")
	}

	// The peer reads EOF, and may still write far more than one window
	// without blocking: the closed side discards it.
	g.SetDeadline(time.Now().Add(20 * time.Second))
	if n, err := g.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("peer Read after Close = %d, %v; want 0, EOF", n, err)
	}
	if n, err := g.Write(make([]byte, 3*DefaultStreamWindow)); err != nil {
		t.Errorf("peer Write after Close: wrote %d, err %v", n, err)
	}
	g.Close()
	// With both sides closed, yamux forgets the stream.
	deadline := time.Now().Add(5 * time.Second)
	for s.NumStreams() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.NumStreams(); n != 0 {
		t.Errorf("host session still tracks %d streams", n)
	}
}

func TestConnectTimeout(t *testing.T) {
	host, _ := testutil.Socketpair(t) // nobody answers
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Connect(ctx, host)
	if !errdefs.IsUnavailable(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Connect = %v, want ErrUnavailable wrapping context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Connect took %v after a 300ms deadline", d)
	}
	if _, err := host.Write([]byte("x")); err == nil {
		t.Error("conn still open after a failed Connect")
	}
}

func TestAcceptCancel(t *testing.T) {
	_, guest := testutil.Socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := Accept(ctx, guest)
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-errc:
		if !errdefs.IsUnavailable(err) || !errors.Is(err, context.Canceled) {
			t.Errorf("Accept = %v, want ErrUnavailable wrapping context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept did not return after cancel")
	}
}

// Closing a guest session detaches it from the port without closing the
// port, and Done fires; the host's session then still has its socket, and
// a new Accept + Connect pair works on the same port.
func TestGuestSessionCloseKeepsPort(t *testing.T) {
	port := newFakePort(t)
	ctx := context.Background()
	accepted := make(chan *Session, 1)
	go func() {
		s, err := Accept(ctx, port.guest)
		if err != nil {
			t.Error(err)
		}
		accepted <- s
	}()
	s1 := mustConnect(t, port.connect(t))
	gs := <-accepted
	if err := gs.Close(); err != nil {
		t.Fatalf("guest Close: %v", err)
	}
	select {
	case <-gs.Done():
	default:
		t.Fatal("guest session Done not closed after Close returned")
	}
	s1.Close()

	_, stop := guestLoop(t, port.guest, echo)
	defer stop()
	s2 := mustConnect(t, port.connect(t))
	roundTrip(t, s2, "after-guest-close", []byte("still works"))
}

func TestOpenRejectsBadNames(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	_, stop := guestLoop(t, guest, echo)
	defer stop()
	s := mustConnect(t, host)
	for _, name := range []string{"", strings.Repeat("n", maxNameLen+1)} {
		if _, err := s.Open(name); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Open(%d-byte name) = %v, want ErrInvalidArgument", len(name), err)
		}
	}
	open, err := s.Open("open-at-close")
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := open.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write on a stream of a closed session = %v, want net.ErrClosed", err)
	}
	if _, err := open.Read(make([]byte, 1)); err != io.EOF && !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read on a stream of a closed session = %v, want EOF or net.ErrClosed", err)
	}
	if _, err := s.Open("late"); !errdefs.IsUnavailable(err) || !errors.Is(err, net.ErrClosed) {
		t.Errorf("Open after Close = %v, want ErrUnavailable wrapping net.ErrClosed", err)
	}
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Error("Done not closed after Close")
	}
}

// A host that dies in the middle of a data frame leaves the guest's
// session waiting for the rest of the body; if the guest never sees the
// hang-up (a new host connected first), the new host's SYNC must still get
// through: its padded resends complete the body and kill that session.
func TestReconnectMidFrame(t *testing.T) {
	port := newFakePort(t)
	held := make(chan struct{}, 1)
	_, stop := guestLoop(t, port.guest, func(name string, c net.Conn) {
		if name == "held" {
			held <- struct{}{}
			io.Copy(io.Discard, c)
			return
		}
		echo(name, c)
	})
	defer stop()

	h1 := port.connect(t)
	s1 := mustConnect(t, h1)
	c, err := s1.Open("held") // stream 1: the host's first
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	<-held
	// A data frame for stream 1 announcing a full-size body, of which only
	// a little arrives.
	hdr := make([]byte, frameHeaderLen)
	hdr[1] = 0 // typeData
	binary.BigEndian.PutUint32(hdr[4:], 1)
	binary.BigEndian.PutUint32(hdr[8:], MaxFrameBody)
	if _, err := h1.Write(append(hdr, make([]byte, 1000)...)); err != nil {
		t.Fatal(err)
	}
	s1.Close()

	s2 := mustConnect(t, port.connect(t))
	roundTrip(t, s2, "after-cut-frame", []byte("through"))
}

// A guest slower than the host's resend interval (a TCG boot) finds
// several SYNC copies, padded, queued behind the first: it answers once
// and its session must skip the rest, not die on them.
func TestSlowGuestSkipsResentSyncs(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	connected := make(chan *Session, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := Connect(ctx, host)
		if err != nil {
			t.Error(err)
		}
		connected <- s
	}()
	time.Sleep(3*syncResendFirst + 50*time.Millisecond) // three resends queued
	sessions, stop := guestLoop(t, guest, echo)
	defer stop()
	s := <-connected
	if s == nil {
		t.FailNow()
	}
	defer s.Close()
	roundTrip(t, s, "slow", []byte("guest"))
	if n := len(sessions); n != 1 {
		t.Errorf("guest accepted %d sessions, want 1", n)
	}
}

// A guest that answers the same SYNC twice (its first session died before
// the host's first frame) must not break the host's session.
func TestHostSkipsRepeatedReady(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	go func() {
		br := bufio.NewReader(guest)
		_, nonce, err := readToken(br)
		if err != nil {
			t.Error(err)
			return
		}
		ready := formatToken(kindReady, nonce)
		guest.Write(append(append([]byte("stale"), ready...), ready...))
		s, err := newSession(newRawConn(br, guest, nil, kindSync, nonce), false, nil)
		if err != nil {
			t.Error(err)
			return
		}
		name, c, err := s.Accept()
		if err == nil {
			echo(name, c)
		}
	}()
	s := mustConnect(t, host)
	roundTrip(t, s, "once", []byte("twice"))
}

// firstWrite records the first Write on a conn.
type firstWrite struct {
	net.Conn
	once  sync.Once
	first chan []byte
}

func (f *firstWrite) Write(p []byte) (int, error) {
	f.once.Do(func() { f.first <- append([]byte(nil), p...) })
	return f.Conn.Write(p)
}

// A VM restored from a template (or handed over by the pool) resumes with
// its agent inside the session of a host it never saw go: with
// WithStaleSession the first SYNC already carries the padding that ends
// that session, and the new host's session works.
func TestStaleSessionPaddedFirstSync(t *testing.T) {
	port := newFakePort(t)
	sessions, stop := guestLoop(t, port.guest, echo)
	defer stop()

	s1 := mustConnect(t, port.connect(t))
	roundTrip(t, s1, "warm-up", []byte("one"))
	// The guest does not notice this host leave (virtio-serial).
	s1.Close()

	h := &firstWrite{Conn: port.connect(t), first: make(chan []byte, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s2, err := Connect(ctx, h, WithStaleSession())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	roundTrip(t, s2, "after-stale", []byte("two"))
	first := <-h.first
	if !bytes.HasPrefix(first, syncPadding) {
		t.Errorf("first SYNC copy starts %q, want the %d-byte padding", first[:min(len(first), 16)], len(syncPadding))
	}
	if tok := first[len(syncPadding):]; !bytes.HasPrefix(tok, []byte(tokenPrefix+kindSync+":")) || tok[len(tok)-1] != '\n' {
		t.Errorf("first SYNC copy ends %q, want one SYNC token after the padding", tok)
	}
	if n := len(sessions); n != 2 {
		t.Errorf("guest accepted %d sessions, want 2", n)
	}
}

// Without WithStaleSession the first copy is the bare token (a booting
// guest has nothing to end), the second padded.
func TestResendSyncCopies(t *testing.T) {
	token := formatToken(kindSync, "0123456789abcdef")
	for _, padFirst := range []bool{false, true} {
		r, w := net.Pipe()
		stop := make(chan struct{})
		done := make(chan error, 1)
		go func() { done <- resendSync(w, token, padFirst, stop) }()
		var copies [][]byte
		buf := make([]byte, 2*len(syncPadding))
		for len(copies) < 3 {
			// net.Pipe delivers each Write whole to reads large enough
			// (in pieces of at most len(buf)); a copy ends with '\n'.
			var c []byte
			for len(c) == 0 || c[len(c)-1] != '\n' {
				n, err := r.Read(buf)
				if err != nil {
					t.Fatal(err)
				}
				c = append(c, buf[:n]...)
			}
			copies = append(copies, c)
		}
		close(stop)
		go io.Copy(io.Discard, r)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		r.Close()
		padded := append(append([]byte(nil), syncPadding...), token...)
		want := [][]byte{token, padded, token}
		if padFirst {
			want[0] = padded
		}
		for i := range want {
			if !bytes.Equal(copies[i], want[i]) {
				t.Errorf("padFirst=%v: copy %d is %d bytes, want %d (padded: %v)", padFirst, i, len(copies[i]), len(want[i]), len(want[i]) > len(token))
			}
		}
	}
}

// A guest session whose host went away reports why: the channel's EOF.
func TestSessionErrHostGone(t *testing.T) {
	host, guest := testutil.Socketpair(t)
	sessions, stop := guestLoop(t, guest, echo)
	defer stop()
	s := mustConnect(t, host)
	roundTrip(t, s, "one", []byte("x"))
	if st := s.Stats(); st.Read == 0 || st.Written == 0 {
		t.Errorf("Stats after a round trip = %+v, want bytes both ways", st)
	}
	s.Close()
	g := <-sessions
	select {
	case <-g.Done():
	case <-time.After(time.Minute):
		t.Fatal("the guest's session did not end when the host closed")
	}
	if err := g.Err(); !errors.Is(err, io.EOF) {
		t.Errorf("guest session Err = %v, want io.EOF", err)
	}
}
