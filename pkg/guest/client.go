// Package guest is the host's side of the guest agent: the versioned
// protocol (api/v1), the stream transport (transport) and the client the
// shim uses.
package guest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
	"github.com/macvm/macvm/pkg/guest/transport"
)

// Client talks to one guest agent: the agent's ttrpc service on the
// control stream, plus any number of named byte streams for stdio. Its
// AgentService methods return errors wrapping errdefs sentinels (and
// context errors as they are), never raw ttrpc statuses.
type Client struct {
	agent.AgentService

	sess *transport.Session
	rpc  *ttrpc.Client
}

// NewClient performs the transport handshake on conn (bounded by ctx),
// opens the control stream and starts a ttrpc client on it. conn belongs to
// the client from the call on, and is closed if NewClient fails.
func NewClient(ctx context.Context, conn net.Conn, opts ...transport.Option) (*Client, error) {
	sess, err := transport.Connect(ctx, conn, opts...)
	if err != nil {
		return nil, err
	}
	ctl, err := sess.Open(transport.ControlStream)
	if err != nil {
		sess.Close()
		return nil, err
	}
	rpc := ttrpc.NewClient(ctl,
		ttrpc.WithUnaryClientInterceptor(nativeErrors),
		// Without its control stream the session is of no use: end it, so
		// that Done reports the loss of the agent.
		ttrpc.WithOnClose(func() { go sess.Close() }),
	)
	return &Client{AgentService: agent.NewAgentClient(rpc), sess: sess, rpc: rpc}, nil
}

// nativeErrors converts the agent's error statuses, and the loss of the
// connection, into errdefs errors. ttrpc.Client.Call turns a status into an
// error only after the interceptor has returned, so the status is read
// from the response here.
func nativeErrors(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, _ *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
	if err := invoke(ctx, req, resp); err != nil {
		if _, ok := status.FromError(err); ok {
			return errgrpc.ToNative(err)
		}
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return err // errdefs.IsCanceled / IsDeadlineExceeded know them
		}
		// Anything else failed below the RPC: the connection is gone.
		return fmt.Errorf("%w: agent %s: %w", errdefs.ErrUnavailable, req.Method, err)
	}
	if resp.Status != nil && resp.Status.Code != int32(codes.OK) {
		return errgrpc.ToNative(status.ErrorProto(resp.Status))
	}
	return nil
}

// OpenStream opens a named byte stream to the guest, typically a process's
// stdin, stdout or stderr whose name the host then puts in the request's
// Stdio. The conn supports CloseWrite (half-close).
func (c *Client) OpenStream(name string) (net.Conn, error) {
	return c.sess.Open(name)
}

// Close ends the control connection and the session, with every stream.
func (c *Client) Close() error {
	return errors.Join(c.rpc.Close(), c.sess.Close())
}

// diagnosePing bounds Diagnose's ping (a variable so tests can shorten it).
var diagnosePing = 5 * time.Second

// Diagnose describes the transport under an agent that does not answer,
// for the log line of a give-up: the bytes each way since the handshake
// (nothing from the guest means it never processed the host's frames: it
// acknowledges every stream the host opens), and whether the guest's
// session still answers a ping below the ttrpc stream (yes: the session
// reads the channel and the agent's server is stuck; no: the guest's
// session is gone, or the guest does not run).
func (c *Client) Diagnose(ctx context.Context) string {
	st := c.sess.Stats()
	ctx, cancel := context.WithTimeout(ctx, diagnosePing)
	defer cancel()
	ping := "answered"
	if rtt, err := c.sess.Ping(ctx); err != nil {
		ping = fmt.Sprintf("not answered (%v)", err)
	} else {
		ping += " in " + rtt.Round(time.Microsecond).String()
	}
	return fmt.Sprintf("since the handshake the host sent %d bytes and received %d; a transport ping %s", st.Written, st.Read, ping)
}

// Done is closed when the connection to the agent is gone (closed, the
// channel broke or the VM went away).
func (c *Client) Done() <-chan struct{} { return c.sess.Done() }
