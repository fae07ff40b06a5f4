package transport

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// The resync tokens. The raw channel carries no framing of its own and, on
// virtio-serial, bytes written while nobody listens are delivered to whoever
// connects next, so both ends start by scanning for a token they cannot
// mistake for stale data: a NUL, a magic word, and a nonce fresh for each
// Connect. A yamux header starts with version 0 followed by a type byte in
// 0..3, never 'M', which is how each side tells a repeated token from the
// first yamux frame (see rawConn.skipSyncs).
const (
	tokenPrefix = "\x00MACVM-"
	kindSync    = "SYNC1"
	kindReady   = "READY1"
	nonceLen    = 16 // hex digits
	// maxTokenBody bounds how far past a prefix the scanner reads before it
	// gives up on a candidate: kind, ':', nonce, '\n'.
	maxTokenBody = len(kindReady) + 1 + nonceLen + 1
)

// Resend pacing for the host's SYNC. A guest session that is still alive
// from a previous host (it did not notice the hang-up before the new host
// connected) reads the first SYNC as a corrupt yamux frame and dies,
// consuming it; a later copy reaches the guest's fresh Accept. The interval
// grows so that a slow (TCG) boot is not flooded with copies.
const (
	syncResendFirst = 50 * time.Millisecond
	syncResendMax   = time.Second
)

// The sync padding precedes the second SYNC copy (one padded copy is enough:
// once the old session is dead, the guest's scanner reads what follows). A guest session left
// over from a host that went away while it was sending may be inside a
// data frame whose body will never come, and read our SYNC as body bytes;
// frames are at most MaxFrameBody long (see streamConn.Write), so this
// padding completes any such body. Its bytes are not a yamux version (0),
// so the old session then fails on the first header it reads instead of
// parsing the padding or the token as frames, and the scanners skip them.
//
// The padding is built only when a second copy is sent (most handshakes are
// answered at the first): as a package variable its 256 KiB stayed resident
// in every shim and agent.
const (
	syncPadByte = 0xff
	syncPadLen  = MaxFrameBody + frameHeaderLen
)

func formatToken(kind, nonce string) []byte {
	return []byte(tokenPrefix + kind + ":" + nonce + "\n")
}

func newNonce() (string, error) {
	var b [nonceLen / 2]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// readToken discards bytes from r until it has read a well-formed token and
// returns its kind and nonce. Anything else, including truncated or
// malformed tokens, is stale data from an earlier session and is dropped.
func readToken(r *bufio.Reader) (kind, nonce string, err error) {
	matched := 0 // bytes of tokenPrefix matched so far
	for {
		if matched == 0 {
			// Skip to the next NUL without a byte-by-byte loop: stale data
			// and padding can be long, and the guest runs emulated.
			if err := skipToNUL(r); err != nil {
				return "", "", err
			}
		}
		b, err := r.ReadByte()
		if err != nil {
			return "", "", err
		}
		switch {
		case b == tokenPrefix[matched]:
			matched++
		case b == tokenPrefix[0]:
			matched = 1
		default:
			matched = 0
		}
		if matched < len(tokenPrefix) {
			continue
		}
		// The prefix is complete: read the body up to the newline. A NUL in
		// the body restarts matching there, so a truncated token followed by
		// a real one still finds the real one.
		matched = 0
		body := make([]byte, 0, maxTokenBody)
		for len(body) <= maxTokenBody {
			b, err := r.ReadByte()
			if err != nil {
				return "", "", err
			}
			if b == '\n' {
				if k, n, ok := parseTokenBody(string(body)); ok {
					return k, n, nil
				}
				break
			}
			if b == tokenPrefix[0] {
				matched = 1
				break
			}
			body = append(body, b)
		}
	}
}

// skipToNUL discards bytes up to, not including, the next NUL.
func skipToNUL(r *bufio.Reader) error {
	for {
		buf, err := r.Peek(max(r.Buffered(), 1))
		if len(buf) == 0 {
			return err
		}
		if i := bytes.IndexByte(buf, 0); i >= 0 {
			_, err := r.Discard(i)
			return err
		}
		if _, err := r.Discard(len(buf)); err != nil {
			return err
		}
	}
}

func parseTokenBody(body string) (kind, nonce string, ok bool) {
	kind, nonce, found := strings.Cut(body, ":")
	if !found || (kind != kindSync && kind != kindReady) || len(nonce) != nonceLen {
		return "", "", false
	}
	for _, c := range []byte(nonce) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", "", false
		}
	}
	return kind, nonce, true
}

// Connect is the host side of the handshake. It sends a SYNC token with a
// fresh nonce (again, with growing pauses, until answered), discards
// everything the guest sent before the READY echo of that nonce, and then
// starts a yamux client session on conn. ctx bounds the handshake only.
//
// The session owns conn from the call on: conn is closed if the handshake
// fails and when the session is closed.
func Connect(ctx context.Context, conn net.Conn, opts ...Option) (*Session, error) {
	nonce, err := newNonce()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: transport: nonce: %w", errdefs.ErrInternal, err)
	}
	// Cancelling ctx must also interrupt a blocked Read or Write.
	stopKick := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })

	stopSync := make(chan struct{})
	syncDone := make(chan error, 1)
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	go func() {
		syncDone <- resendSync(conn, formatToken(kindSync, nonce), o.staleSession, stopSync)
	}()

	br := bufio.NewReaderSize(conn, 64<<10)
	var scanErr error
	for {
		kind, got, err := readToken(br)
		if err != nil {
			scanErr = err
			break
		}
		if kind == kindReady && got == nonce {
			break
		}
	}
	// No SYNC may follow the yamux bytes: wait until the writer has stopped
	// (a write in progress completes, since the guest is reading).
	close(stopSync)
	writeErr := <-syncDone
	kicked := !stopKick()

	if err := errors.Join(scanErr, writeErr); err != nil || kicked {
		conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: transport: no READY from the guest: %w", errdefs.ErrUnavailable, ctx.Err())
		}
		return nil, fmt.Errorf("%w: transport: handshake: %w", errdefs.ErrUnavailable, err)
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: transport: clear deadline: %w", errdefs.ErrInternal, err)
	}
	return newSession(newRawConn(br, conn, conn, kindReady, nonce), true, opts)
}

// resendSync writes token at once and then again at growing intervals
// until stop is closed. The first copy goes bare unless padFirst: a fresh
// guest, or one that saw the previous host hang up, answers it at once. The
// second is padded (see syncPadByte); later ones go bare again so that a
// slow boot does not queue much for the guest to scan. padFirst pads the
// first copy too (WithStaleSession).
func resendSync(w io.Writer, token []byte, padFirst bool, stop <-chan struct{}) error {
	interval := syncResendFirst
	timer := time.NewTimer(0)
	defer timer.Stop()
	var padded []byte
	for copies := 0; ; copies++ {
		select {
		case <-stop:
			return nil
		case <-timer.C:
		}
		msg := token
		if copies == 1 || (copies == 0 && padFirst) {
			if padded == nil {
				padded = append(bytes.Repeat([]byte{syncPadByte}, syncPadLen), token...)
			}
			msg = padded
		}
		if _, err := w.Write(msg); err != nil {
			return err
		}
		timer.Reset(interval)
		interval = min(2*interval, syncResendMax)
	}
}

// Accept is the guest side of the handshake. It discards bytes on rw until
// a host's SYNC token, answers it with READY and starts a yamux server
// session. When that session dies (the host went away, or a new host's SYNC
// arrived and corrupted it) the caller calls Accept again on the same rw.
//
// The session never closes rw: the port outlives hosts. For ctx and Close
// to interrupt a blocked read or write, rw should implement
// SetDeadline(time.Time) error (net.Conn and the channel from
// OpenVirtioSerial do); otherwise they take effect at rw's next read.
// Bytes buffered by a dead session are dropped; the host's SYNC resend
// covers for a SYNC lost that way.
func Accept(ctx context.Context, rw io.ReadWriter, opts ...Option) (*Session, error) {
	// A previous session's Close kicked rw with a deadline in the past.
	if err := setDeadline(rw, time.Time{}); err != nil {
		return nil, fmt.Errorf("%w: transport: clear deadline: %w", errdefs.ErrInternal, err)
	}
	stopKick := context.AfterFunc(ctx, func() { setDeadline(rw, time.Now()) })

	br := bufio.NewReaderSize(rw, 64<<10)
	var (
		nonce string
		err   error
	)
	for {
		var kind string
		kind, nonce, err = readToken(br)
		if err != nil || kind == kindSync {
			break
		}
	}
	if err == nil {
		_, err = rw.Write(formatToken(kindReady, nonce))
	}
	if !stopKick() {
		setDeadline(rw, time.Time{})
		return nil, fmt.Errorf("%w: transport: waiting for the host: %w", errdefs.ErrUnavailable, ctx.Err())
	}
	if err != nil {
		return nil, fmt.Errorf("%w: transport: waiting for the host: %w", errdefs.ErrUnavailable, err)
	}
	return newSession(newRawConn(br, rw, nil, kindSync, nonce), false, opts)
}

// deadliner is what Close and ctx use to interrupt blocked I/O on a channel
// that must not be closed.
type deadliner interface {
	SetDeadline(time.Time) error
}

func setDeadline(rw any, t time.Time) error {
	if d, ok := rw.(deadliner); ok {
		return d.SetDeadline(t)
	}
	return nil
}
