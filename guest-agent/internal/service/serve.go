package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/guest/transport"
)

// streamTTL is how long a stdio stream nobody claims is kept (the RPC that
// named it may have failed).
const streamTTL = time.Minute

// Streams routes stdio stream claims to the current session's table. The
// host may reconnect (a new session) while containers live on; a claim goes
// to whichever session is current.
type Streams struct {
	// mu guards table and changed.
	mu      sync.Mutex
	table   *transport.StreamTable
	changed chan struct{}
}

// NewStreams returns a router with no session yet.
func NewStreams() *Streams { return &Streams{changed: make(chan struct{})} }

func (s *Streams) set(t *transport.StreamTable) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.table = t
	close(s.changed)
	s.changed = make(chan struct{})
}

// Wait claims the stream called name from the current session, waiting
// (until ctx ends) for a session if there is none.
func (s *Streams) Wait(ctx context.Context, name string) (net.Conn, error) {
	for {
		s.mu.Lock()
		t, changed := s.table, s.changed
		s.mu.Unlock()
		if t == nil {
			select {
			case <-changed:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		c, err := t.Wait(ctx, name)
		if errors.Is(err, errdefs.ErrUnavailable) && ctx.Err() == nil {
			// That session ended; the host will open the stream again on
			// the next one (or ctx will end).
			select {
			case <-changed:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return c, err
	}
}

// Logf is how the serve loop reports.
type Logf func(format string, args ...any)

// sessionLog passes a host session's yamux errors to the console, where
// the host's give-up (a clone that connected and never answered) shows
// them. Not reported: the stale session's end on the next host's SYNC
// padding (0xff, read as protocol version 255), which every warm start
// has, a failed header read (serveSession reports that read's error) and
// writes cut by the session's own end; nor yamux's warnings (frames for
// streams already gone are routine).
type sessionLog struct{ logf Logf }

func (l sessionLog) Printf(format string, args ...any) { l.report(fmt.Sprintf(format, args...)) }
func (l sessionLog) Print(args ...any)                 { l.report(fmt.Sprint(args...)) }
func (l sessionLog) Println(args ...any)               { l.report(fmt.Sprint(args...)) }

func (l sessionLog) report(msg string) {
	if !strings.HasPrefix(msg, "[ERR]") || strings.Contains(msg, "Invalid protocol version: 255") ||
		strings.Contains(msg, "Failed to read header") || strings.Contains(msg, "use of closed") {
		return
	}
	l.logf("agent: host session: %s", msg)
}

// Serve accepts host sessions on the raw channel one after another until ctx
// ends: each session's control streams are served by a ttrpc server, its
// other streams go to the stdio table.
func (s *Service) Serve(ctx context.Context, ch io.ReadWriter, streams *Streams, logf Logf, ready func()) error {
	for {
		sess, err := transport.Accept(ctx, ch, transport.WithLogger(sessionLog{logf}))
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			logf("agent: accept session: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if ready != nil {
			ready()
			ready = nil
		}
		s.serveSession(ctx, sess, streams, logf)
	}
}

func (s *Service) serveSession(ctx context.Context, sess *transport.Session, streams *Streams, logf Logf) {
	table := transport.NewStreamTable(streamTTL)
	streams.set(table)
	l := transport.NewListener(sess, table)
	srv, err := ttrpc.NewServer()
	if err != nil {
		logf("agent: ttrpc server: %v", err)
		sess.Close()
		return
	}
	agent.RegisterAgentService(srv, s)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	select {
	case <-sess.Done():
	case <-ctx.Done():
	}
	srv.Close()
	l.Close()
	<-served
	sess.Close()
	if err := sess.Err(); err != nil && ctx.Err() == nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		// Why the host's session ended, when the channel says: a host
		// that went away (EOF) or a new host's token. A session that
		// ends for no channel error ended of a protocol error, which
		// sessionLog reports unless it is the expected end of a stale
		// session (the next host's padding).
		logf("agent: host session ended: %v", err)
	}
	// Claims in flight fail over to the next session.
	streams.set(nil)
	table.Close()
}
