// Package testutil holds the few helpers that tests of several packages
// share: a connected socket pair standing in for the host<->guest channel,
// and one request/response exchange over a half-closable stream.
package testutil

import (
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// Socketpair returns two connected unix stream sockets, the closest thing to
// the hypervisor's channel socket that needs no VM. Both are closed when the
// test ends.
func Socketpair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// Exchange writes body to c and half-closes it while reading c to EOF, all
// within timeout, and returns what was read. It closes c.
func Exchange(t testing.TB, c net.Conn, body []byte, timeout time.Duration) []byte {
	t.Helper()
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(body)
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	return got
}
