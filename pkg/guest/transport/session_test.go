package transport

import (
	"net"
	"testing"
)

func TestConnectAccept(t *testing.T) {
	for _, tc := range []struct {
		name string
		pair func(testing.TB) (net.Conn, net.Conn)
	}{
		{"socketpair", socketpair},
		{"net.Pipe", func(testing.TB) (net.Conn, net.Conn) { return net.Pipe() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, guest := tc.pair(t)
			names := make(chan string, 4)
			_, stop := guestLoop(t, guest, func(name string, c net.Conn) {
				names <- name
				echo(name, c)
			})
			defer stop()
			s := mustConnect(t, host)
			roundTrip(t, s, "ttrpc", []byte("hello"))
			roundTrip(t, s, "exec-1-stdout", []byte("world"))
			for _, want := range []string{"ttrpc", "exec-1-stdout"} {
				if got := <-names; got != want {
					t.Errorf("guest accepted stream %q, want %q", got, want)
				}
			}
		})
	}
}
