//go:build linux

// Command testinit is a minimal /init for the transport's VM test: it loads
// the initramfs's kernel modules, opens the agent's virtio-serial port and
// serves test streams over transport sessions, accepting a new session
// whenever the host reconnects, exactly as the guest agent does.
//
// Streams, by name: "echo" copies back until EOF; "sink" answers the hex
// sha256 of everything it read; "source:N" sends N deterministic bytes;
// "discard" answers the number of bytes it read; "zeros:N" sends N zero
// bytes (those two measure the transport, not the guest's CPU);
// "sessions" answers how many sessions have been accepted so far.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/pkg/guest/transport"
)

var sessions atomic.Int64

func main() {
	if err := setup(); err != nil {
		fmt.Printf("testinit: %v\n", err)
	}
	port, err := openPort("agent")
	if err != nil {
		fmt.Printf("testinit: %v\n", err)
		halt()
	}
	fmt.Println("testinit: port open")
	for {
		sess, err := transport.Accept(context.Background(), port)
		if err != nil {
			fmt.Printf("testinit: accept: %v\n", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		n := sessions.Add(1)
		fmt.Printf("testinit: session %d\n", n)
		for {
			name, c, err := sess.Accept()
			if err != nil {
				break
			}
			go serve(name, c)
		}
		<-sess.Done()
		fmt.Printf("testinit: session %d ended\n", n)
	}
}

func serve(name string, c net.Conn) {
	defer c.Close()
	switch {
	case name == "echo":
		io.Copy(c, c)
		c.(interface{ CloseWrite() error }).CloseWrite()
	case name == "sink":
		h := sha256.New()
		io.Copy(h, c)
		io.WriteString(c, hex.EncodeToString(h.Sum(nil)))
	case strings.HasPrefix(name, "source:"):
		n, _ := strconv.ParseInt(strings.TrimPrefix(name, "source:"), 10, 64)
		w := bufio.NewWriterSize(c, 1<<20)
		io.Copy(w, io.LimitReader(rand.NewChaCha8([32]byte{7}), n))
		w.Flush()
	case name == "discard":
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprint(c, n)
	case strings.HasPrefix(name, "zeros:"):
		n, _ := strconv.ParseInt(strings.TrimPrefix(name, "zeros:"), 10, 64)
		buf := make([]byte, 1<<20)
		for ; n > 0; n -= int64(len(buf)) {
			if _, err := c.Write(buf[:min(n, int64(len(buf)))]); err != nil {
				return
			}
		}
	case name == "sessions":
		fmt.Fprint(c, sessions.Load())
	}
}

func setup() error {
	for _, m := range []struct{ src, dir, fstype string }{
		{"devtmpfs", "/dev", "devtmpfs"},
		{"sysfs", "/sys", "sysfs"},
		{"proc", "/proc", "proc"},
	} {
		os.MkdirAll(m.dir, 0o755)
		if err := unix.Mount(m.src, m.dir, m.fstype, 0, ""); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.dir, err)
		}
	}
	list, err := os.ReadFile("/lib/modules/load.list")
	if err != nil {
		return nil // everything built in
	}
	for _, p := range strings.Fields(string(list)) {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("load %s: %w", p, err)
		}
	}
	return nil
}

func openPort(name string) (io.ReadWriteCloser, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		p, err := transport.OpenVirtioSerial(name)
		if err == nil || time.Now().After(deadline) {
			return p, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func halt() {
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}
