package transport

import (
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/macvm/macvm/internal/testutil"
)

// benchPair connects a host and a guest session over a unix socketpair with
// the given options.
func benchPair(b *testing.B, opts ...Option) (host, guest *Session) {
	b.Helper()
	hc, gc := testutil.Socketpair(b)
	accepted := make(chan *Session, 1)
	go func() {
		s, err := Accept(context.Background(), gc, opts...)
		if err != nil {
			b.Error(err)
		}
		accepted <- s
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	host, err := Connect(ctx, hc, opts...)
	if err != nil {
		b.Fatal(err)
	}
	guest = <-accepted
	b.Cleanup(func() { host.Close(); guest.Close() })
	return host, guest
}

// BenchmarkStreamThroughput pushes data host->guest through one stream, for
// several window sizes (the window bounds in-flight bytes per stream).
func BenchmarkStreamThroughput(b *testing.B) {
	for _, window := range []uint32{256 << 10, 1 << 20, 4 << 20, DefaultStreamWindow, 16 << 20} {
		b.Run(fmt.Sprintf("window=%dKiB", window>>10), func(b *testing.B) {
			host, guest := benchPair(b, WithStreamWindow(window))
			const chunk = 1 << 20
			done := make(chan int64, 1)
			go func() {
				_, c, err := guest.Accept()
				if err != nil {
					b.Error(err)
					done <- 0
					return
				}
				n, _ := io.Copy(io.Discard, c)
				done <- n
			}()
			c, err := host.Open("throughput")
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, chunk)
			b.SetBytes(chunk)
			b.ResetTimer()
			for b.Loop() {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.(interface{ CloseWrite() error }).CloseWrite()
			if n := <-done; n != int64(b.N)*chunk {
				b.Fatalf("guest read %d bytes, want %d", n, int64(b.N)*chunk)
			}
		})
	}
}

// BenchmarkRoundTrip measures a one-byte ping-pong on an open stream: the
// transport's share of every RPC's latency.
func BenchmarkRoundTrip(b *testing.B) {
	host, guest := benchPair(b)
	go func() {
		_, c, err := guest.Accept()
		if err != nil {
			return
		}
		io.Copy(c, c)
		c.Close()
	}()
	c, err := host.Open("ping")
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1)
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOpenStream measures opening a named stream and getting its first
// byte back, as the shim does for every process's stdio.
func BenchmarkOpenStream(b *testing.B) {
	host, guest := benchPair(b)
	go func() {
		for {
			_, c, err := guest.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				c.Write([]byte{1})
				c.Close()
			}(c)
		}
	}()
	buf := make([]byte, 1)
	for b.Loop() {
		c, err := host.Open("stdout")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
