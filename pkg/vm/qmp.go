package vm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// qmpClient is a minimal QEMU Machine Protocol client: enough to unpause,
// pause and resume a VM and to receive the events that tell us when the
// guest opened the agent port and why the VM shut down. One goroutine
// reads everything QEMU sends; commands carry ids so a reply that arrives
// after its caller gave up cannot be mistaken for the next one's.
type qmpClient struct {
	conn    net.Conn
	onEvent func(name string, data json.RawMessage)

	greeting chan struct{} // closed when QEMU's greeting has arrived
	done     chan struct{} // closed when the reader has stopped
	readErr  error         // why the reader stopped; written before done closes

	mu      sync.Mutex // guards nextID and pending
	nextID  uint64
	pending map[uint64]chan qmpMessage
}

type qmpMessage struct {
	Greeting json.RawMessage `json:"QMP,omitempty"`
	Return   json.RawMessage `json:"return,omitempty"`
	Error    *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error,omitempty"`
	Event string          `json:"event,omitempty"`
	Data  json.RawMessage `json:"data,omitempty"`
	ID    *uint64         `json:"id,omitempty"`
}

// newQMP starts reading conn. onEvent runs on the reader goroutine and
// must not block or call back into the client.
func newQMP(conn net.Conn, onEvent func(string, json.RawMessage)) *qmpClient {
	q := &qmpClient{
		conn:     conn,
		onEvent:  onEvent,
		greeting: make(chan struct{}),
		done:     make(chan struct{}),
		pending:  map[uint64]chan qmpMessage{},
	}
	go q.read()
	return q
}

func (q *qmpClient) read() {
	sc := bufio.NewScanner(q.conn)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	greeted := false
	for sc.Scan() {
		var m qmpMessage
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			continue // QMP only sends JSON objects; skip anything else
		}
		switch {
		case m.Greeting != nil:
			if !greeted {
				greeted = true
				close(q.greeting)
			}
		case m.Event != "":
			if q.onEvent != nil {
				q.onEvent(m.Event, m.Data)
			}
		case m.ID != nil:
			q.mu.Lock()
			ch := q.pending[*m.ID]
			delete(q.pending, *m.ID)
			q.mu.Unlock()
			if ch != nil {
				ch <- m
			}
		}
	}
	q.readErr = sc.Err()
	if q.readErr == nil {
		q.readErr = errors.New("qmp: connection closed")
	}
	close(q.done)
}

// handshake waits for the greeting and leaves capabilities negotiation
// mode; QEMU accepts no other command (and sends no events) before.
func (q *qmpClient) handshake(ctx context.Context) error {
	select {
	case <-q.greeting:
	case <-q.done:
		return fmt.Errorf("qmp: closed before the greeting: %w: %w", errdefs.ErrUnavailable, q.readErr)
	case <-ctx.Done():
		return fmt.Errorf("qmp: waiting for the greeting: %w", ctx.Err())
	}
	_, err := q.execute(ctx, "qmp_capabilities", nil)
	return err
}

// execute runs one command and returns its "return" value. A QMP error
// reply wraps errdefs.ErrFailedPrecondition (QEMU refused in its current
// state); a closed monitor wraps errdefs.ErrUnavailable.
func (q *qmpClient) execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	return q.send(ctx, cmd, args, nil)
}

// executeFD runs one command that takes a file descriptor (getfd, add-fd):
// f travels with the command as SCM_RIGHTS.
func (q *qmpClient) executeFD(ctx context.Context, cmd string, args any, f *os.File) error {
	_, err := q.send(ctx, cmd, args, f)
	return err
}

// send writes one command, with f as SCM_RIGHTS when it is not nil, and
// waits for the reply carrying its id.
func (q *qmpClient) send(ctx context.Context, cmd string, args any, f *os.File) (json.RawMessage, error) {
	var uc *net.UnixConn
	if f != nil {
		var ok bool
		if uc, ok = q.conn.(*net.UnixConn); !ok {
			return nil, fmt.Errorf("qmp %s: the monitor is not a unix socket: %w", cmd, errdefs.ErrNotImplemented)
		}
	}
	ch := make(chan qmpMessage, 1)
	q.mu.Lock()
	q.nextID++
	id := q.nextID
	q.pending[id] = ch
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
	}()

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = q.conn.SetWriteDeadline(dl)
	}
	if uc != nil {
		_, _, err = uc.WriteMsgUnix(append(b, '\n'), unix.UnixRights(int(f.Fd())), nil)
	} else {
		_, err = q.conn.Write(append(b, '\n'))
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w: %w", cmd, errdefs.ErrUnavailable, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s: %s: %w", cmd, m.Error.Class, m.Error.Desc, errdefs.ErrFailedPrecondition)
		}
		return m.Return, nil
	case <-q.done:
		return nil, fmt.Errorf("qmp %s: %w: %w", cmd, errdefs.ErrUnavailable, q.readErr)
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (q *qmpClient) close() error { return q.conn.Close() }
