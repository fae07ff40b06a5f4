package service

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// guestEnds is a streamOpener that keeps the guest's end of every stream.
type guestEnds struct {
	// mu guards ends.
	mu   sync.Mutex
	ends map[string]*halfConn
}

func (g *guestEnds) OpenStream(name string) (net.Conn, error) {
	host, guest := streamPair()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ends == nil {
		g.ends = map[string]*halfConn{}
	}
	g.ends[name] = guest
	return host, nil
}

func (g *guestEnds) write(t *testing.T, name, data string) {
	t.Helper()
	g.mu.Lock()
	c := g.ends[name]
	g.mu.Unlock()
	if c == nil {
		t.Fatalf("no stream %s", name)
	}
	io.WriteString(c, data)
	c.CloseWrite()
}

func TestFileLogURI(t *testing.T) {
	path := filepath.Join(t.TempDir(), "logs", "c.log")
	g := &guestEnds{}
	pio, err := newProcessIO(context.Background(), g, "p", stdioSpec{stdout: "file://" + path, stderr: "file://" + path}, "c", "ns")
	if err != nil {
		t.Fatal(err)
	}
	if pio.names.Stdout != "p-stdout" || pio.names.Stderr != "p-stderr" || pio.names.Stdin != "" {
		t.Fatalf("stream names %+v", pio.names)
	}
	g.write(t, "p-stdout", "out\n")
	g.write(t, "p-stderr", "err\n")
	if !pio.wait(5 * time.Second) {
		t.Fatal("output did not complete")
	}
	b, _ := os.ReadFile(path)
	if got := string(b); !strings.Contains(got, "out\n") || !strings.Contains(got, "err\n") {
		t.Errorf("log file holds %q", got)
	}
}

func TestBinaryLogURI(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "logger")
	if err := os.WriteFile(script, []byte(`#!/bin/sh
echo "$CONTAINER_ID $CONTAINER_NAMESPACE $1 $2" > "$0.env"
exec 5>&-
cat <&3 > "$0.out" &
cat <&4 > "$0.err" &
wait
`), 0o755); err != nil {
		t.Fatal(err)
	}
	g := &guestEnds{}
	pio, err := newProcessIO(context.Background(), g, "p", stdioSpec{stdout: "binary://" + script + "?flag=val", stderr: "binary://" + script + "?flag=val"}, "c1", "ns1")
	if err != nil {
		t.Fatal(err)
	}
	g.write(t, "p-stdout", "to out")
	g.write(t, "p-stderr", "to err")
	if !pio.wait(15 * time.Second) {
		t.Fatal("output did not complete")
	}
	for suffix, want := range map[string]string{".out": "to out", ".err": "to err", ".env": "c1 ns1 flag val\n"} {
		b, _ := os.ReadFile(script + suffix)
		if string(b) != want {
			t.Errorf("%s: got %q, want %q", suffix, b, want)
		}
	}
}

// TestOutputBoundedByWait: a guest stream that never ends (a daemonised
// child holding stdout) cannot hold the exit: wait gives up and the host
// ends are closed, so the client's reader sees EOF.
func TestOutputBoundedByWait(t *testing.T) {
	h := newHarness(t, nil)
	out := h.fifo("out")
	outC := readAll(out)
	g := &guestEnds{}
	pio, err := newProcessIO(context.Background(), g, "p", stdioSpec{stdout: out}, "c", "ns")
	if err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	io.WriteString(g.ends["p-stdout"], "partial")
	g.mu.Unlock()
	start := time.Now()
	if pio.wait(200 * time.Millisecond) {
		t.Fatal("wait reported complete output for a stream still open")
	}
	select {
	case got := <-outC:
		if got != "partial" {
			t.Errorf("reader got %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the client's FIFO was never closed")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("wait took %v", d)
	}
}
