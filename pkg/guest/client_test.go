package guest

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/macvm/macvm/internal/testutil"
	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/guest/transport"
)

// fakeAgent answers Info and fails Pids the way the real agent reports a
// missing container. Unimplemented methods panic via the nil interface,
// which ttrpc turns into an error.
type fakeAgent struct {
	agent.AgentService
}

func (fakeAgent) Info(context.Context, *emptypb.Empty) (*agent.InfoResponse, error) {
	return &agent.InfoResponse{AgentVersion: "fake", ProtocolVersion: 1}, nil
}

func (fakeAgent) Pids(_ context.Context, req *agent.PidsRequest) (*agent.PidsResponse, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotFound)
}

// WaitProcess blocks until the caller gives up, to test cancellation.
func (fakeAgent) WaitProcess(ctx context.Context, _ *agent.WaitProcessRequest) (*agent.WaitProcessResponse, error) {
	<-ctx.Done()
	return nil, errgrpc.ToGRPC(ctx.Err())
}

// startGuest serves fakeAgent the way the guest agent does: one session,
// ttrpc on the control stream, other streams echoed.
func startGuest(t testing.TB, rw io.ReadWriter) (stop func()) {
	t.Helper()
	return startGuestWith(t, rw, fakeAgent{})
}

// startGuestWith is startGuest serving svc.
func startGuestWith(t testing.TB, rw io.ReadWriter, svc agent.AgentService) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		sess, err := transport.Accept(ctx, rw)
		if err != nil {
			return
		}
		defer sess.Close()
		table := transport.NewStreamTable(time.Minute)
		defer table.Close()
		srv, err := ttrpc.NewServer()
		if err != nil {
			t.Error(err)
			return
		}
		agent.RegisterAgentService(srv, svc)
		go srv.Serve(ctx, transport.NewListener(sess, table))
		go func() {
			for {
				c, err := table.Wait(ctx, "echo")
				if err != nil {
					return
				}
				go func() {
					io.Copy(c, c)
					c.Close()
				}()
			}
		}()
		select {
		case <-ctx.Done():
		case <-sess.Done():
		}
		srv.Close()
	}()
	return func() {
		cancel()
		<-done
	}
}

func newTestClient(t testing.TB) (*Client, func()) {
	t.Helper()
	host, guest := testutil.Socketpair(t)
	stop := startGuest(t, guest)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := NewClient(ctx, host)
	if err != nil {
		stop()
		t.Fatalf("NewClient: %v", err)
	}
	return c, func() {
		c.Close()
		stop()
	}
}

func TestClientRoundTrip(t *testing.T) {
	c, stop := newTestClient(t)
	defer stop()
	ctx := context.Background()

	info, err := c.Info(ctx, &emptypb.Empty{})
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	if info.AgentVersion != "fake" || info.ProtocolVersion != 1 {
		t.Errorf("Info = %v, want version fake, protocol 1", info)
	}

	_, err = c.Pids(ctx, &agent.PidsRequest{ContainerId: "nope"})
	if !errdefs.IsNotFound(err) {
		t.Errorf("Pids error = %v (%T), want errdefs.IsNotFound", err, err)
	}

	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = c.WaitProcess(short, &agent.WaitProcessRequest{ContainerId: "x"})
	if !errdefs.IsDeadlineExceeded(err) {
		t.Errorf("WaitProcess past its deadline = %v, want errdefs.IsDeadlineExceeded", err)
	}
}

func TestClientStreams(t *testing.T) {
	c, stop := newTestClient(t)
	defer stop()
	s, err := c.OpenStream("echo")
	if err != nil {
		t.Fatal(err)
	}
	s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := s.Write([]byte("stdio")); err != nil {
		t.Fatal(err)
	}
	if err := s.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(s)
	if err != nil || string(got) != "stdio" {
		t.Errorf("echo stream = %q, %v; want %q, nil", got, err, "stdio")
	}
}

func TestClientCloseAndAgentLoss(t *testing.T) {
	t.Run("close", func(t *testing.T) {
		c, stop := newTestClient(t)
		defer stop()
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("Done not closed after Close")
		}
		if _, err := c.Info(context.Background(), &emptypb.Empty{}); !errdefs.IsUnavailable(err) {
			t.Errorf("Info after Close = %v, want errdefs.IsUnavailable", err)
		}
		if _, err := c.OpenStream("late"); !errdefs.IsUnavailable(err) {
			t.Errorf("OpenStream after Close = %v, want errdefs.IsUnavailable", err)
		}
	})
	t.Run("agent gone", func(t *testing.T) {
		host, guest := testutil.Socketpair(t)
		stopGuest := startGuest(t, guest)
		c, err := NewClient(context.Background(), host)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Info(context.Background(), &emptypb.Empty{}); err != nil {
			t.Fatal(err)
		}
		stopGuest()
		guest.Close() // the VM is gone
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("Done not closed after the agent went away")
		}
		_, err = c.Info(context.Background(), &emptypb.Empty{})
		if !errdefs.IsUnavailable(err) {
			t.Errorf("Info after agent loss = %v, want errdefs.IsUnavailable", err)
		}
	})
}

func TestNewClientTimeout(t *testing.T) {
	host, _ := testutil.Socketpair(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := NewClient(ctx, host)
	if !errdefs.IsUnavailable(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("NewClient with no agent = %v, want Unavailable and DeadlineExceeded", err)
	}
}

// BenchmarkRoundTrip measures one small RPC through the whole stack:
// ttrpc over a yamux stream over a unix socketpair.
func BenchmarkRoundTrip(b *testing.B) {
	c, stop := newTestClient(b)
	defer stop()
	ctx := context.Background()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Info(ctx, &emptypb.Empty{}); err != nil {
			b.Fatal(err)
		}
	}
}
