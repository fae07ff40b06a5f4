package guest

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/macvm/macvm/internal/testutil"
	"github.com/macvm/macvm/pkg/guest/transport"
)

// connectSilent connects a client to a guest side that completes the
// handshake and then does what guest does with its session; it returns the
// client after a first RPC has timed out.
func connectSilent(t *testing.T, guest func(s *transport.Session, port net.Conn)) *Client {
	t.Helper()
	host, port := testutil.Socketpair(t)
	go func() {
		s, err := transport.Accept(context.Background(), port)
		if err != nil {
			return
		}
		guest(s, port)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := NewClient(ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rctx, rcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer rcancel()
	if _, err := c.Info(rctx, &emptypb.Empty{}); !errdefs.IsDeadlineExceeded(err) {
		t.Fatalf("Info from a silent guest: %v, want a deadline error", err)
	}
	return c
}

// An agent whose session lives but whose server never answers: Diagnose
// says the guest acknowledged the host's frames and answers a ping.
func TestDiagnoseSilentServer(t *testing.T) {
	c := connectSilent(t, func(s *transport.Session, _ net.Conn) {
		for {
			if _, _, err := s.Accept(); err != nil {
				return
			}
		}
	})
	d := c.Diagnose(context.Background())
	t.Log(d)
	if !strings.Contains(d, "ping answered") || strings.Contains(d, "received 0") {
		t.Errorf("Diagnose = %q, want bytes received and the ping answered", d)
	}
}

// A guest whose session ended right after the handshake, the agent back in
// Accept (scanning the host's frames for a SYNC that will not come), hangs
// a host that has no keepalive: Diagnose says nothing came back and the
// ping is not answered.
func TestDiagnoseGuestSessionGone(t *testing.T) {
	old := diagnosePing
	diagnosePing = 300 * time.Millisecond
	defer func() { diagnosePing = old }()
	c := connectSilent(t, func(s *transport.Session, port net.Conn) {
		s.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		transport.Accept(ctx, port)
	})
	d := c.Diagnose(context.Background())
	t.Log(d)
	if !strings.Contains(d, "ping not answered") || !strings.Contains(d, "received 0") {
		t.Errorf("Diagnose = %q, want nothing received and no ping answer", d)
	}
}
