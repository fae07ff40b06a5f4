package vm

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// fakeQEMU answers QMP commands on one end of a pipe: "stop" fails,
// "slow" answers only after the next command, everything else returns {}.
func fakeQEMU(t *testing.T, conn net.Conn) {
	t.Helper()
	go func() {
		defer conn.Close()
		fmt.Fprintf(conn, `{"QMP": {"version": {}, "capabilities": ["oob"]}}`+"\r\n")
		fmt.Fprintf(conn, `{"event": "VSERPORT_CHANGE", "data": {"id": "agent0", "open": true}}`+"\r\n")
		sc := bufio.NewScanner(conn)
		var held []byte
		for sc.Scan() {
			var req struct {
				Execute string `json:"execute"`
				ID      uint64 `json:"id"`
			}
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				return
			}
			switch req.Execute {
			case "slow":
				held = []byte(fmt.Sprintf(`{"return": {"late": true}, "id": %d}`+"\r\n", req.ID))
				continue
			case "stop":
				fmt.Fprintf(conn, `{"error": {"class": "GenericError", "desc": "nope"}, "id": %d}`+"\r\n", req.ID)
			case "quit":
				return
			default:
				if held != nil {
					conn.Write(held)
					held = nil
				}
				fmt.Fprintf(conn, `{"return": {"cmd": %q}, "id": %d}`+"\r\n", req.Execute, req.ID)
			}
		}
	}()
}

func TestQMPClient(t *testing.T) {
	host, guest := net.Pipe()
	fakeQEMU(t, guest)
	events := make(chan string, 10)
	q := newQMP(host, func(name string, data json.RawMessage) { events <- name + " " + string(data) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := q.handshake(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-events:
		if ev != `VSERPORT_CHANGE {"id": "agent0", "open": true}` {
			t.Errorf("event: got %q", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no event delivered")
	}

	if _, err := q.execute(ctx, "stop", nil); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("error reply: got %v, want ErrFailedPrecondition", err)
	}

	// A command whose caller gave up must not answer the next one.
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	if _, err := q.execute(short, "slow", nil); err == nil {
		t.Error("slow command returned before its reply")
	}
	cancelShort()
	ret, err := q.execute(ctx, "cont", nil)
	if err != nil {
		t.Fatal(err)
	}
	if string(ret) != `{"cmd": "cont"}` {
		t.Errorf("cont got the reply %s", ret)
	}

	// QEMU going away fails commands as unavailable.
	if _, err := q.execute(ctx, "quit", nil); !errdefs.IsUnavailable(err) {
		t.Errorf("after close: got %v, want ErrUnavailable", err)
	}
	select {
	case <-q.done:
	case <-time.After(5 * time.Second):
		t.Fatal("reader did not stop")
	}
}
