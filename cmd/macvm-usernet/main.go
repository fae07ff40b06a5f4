// Command macvm-usernet runs one VM's user-space network (package
// pkg/network/userstack) for the shim, in a process of its own so that the
// shim does not link the network stack (see userstack's doc).
//
// Protocol (pkg/network.UserNet is the other side): fd 3 is the stack's end
// of a connected datagram socket pair; each argument publishes a port,
// HOSTADDR=GUESTPORT. Once serving it writes one line "published ADDR" per
// port, in order, then "ready"; on failure one line "error MESSAGE" and
// exits 1. It runs until its stdin reaches EOF: the shim closes it, or the
// shim is gone.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/macvm/macvm/pkg/network"
	"github.com/macvm/macvm/pkg/network/userstack"
)

func main() {
	if err := run(); err != nil {
		fmt.Printf("error %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
}

func run() error {
	var ports []network.PortForward
	for _, a := range os.Args[1:] {
		addr, guest, ok := strings.Cut(a, "=")
		gp, err := strconv.Atoi(guest)
		if !ok || err != nil {
			return fmt.Errorf("argument %q: want HOSTADDR=GUESTPORT", a)
		}
		ports = append(ports, network.PortForward{HostAddr: addr, GuestPort: gp})
	}
	f := os.NewFile(3, "usernet")
	if f == nil {
		return fmt.Errorf("no socket on fd 3")
	}
	host, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("fd 3: %w", err)
	}
	s, err := userstack.Start(host, ports)
	if err != nil {
		host.Close()
		return err
	}
	var b strings.Builder
	for _, a := range s.Published() {
		fmt.Fprintf(&b, "published %s\n", a)
	}
	b.WriteString("ready\n")
	if _, err := os.Stdout.WriteString(b.String()); err != nil {
		s.Close()
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return s.Close()
}
