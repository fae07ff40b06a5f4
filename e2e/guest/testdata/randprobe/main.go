// Command randprobe runs inside a test container: it prints 32 bytes from
// /dev/urandom, 32 bytes from getrandom(2) and the wall clock, so a test can
// tell two VMs' random streams and clocks apart.
package main

import (
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	f, err := os.Open("/dev/urandom")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	u := make([]byte, 32)
	if _, err := io.ReadFull(f, u); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	g := make([]byte, 32)
	if n, err := unix.Getrandom(g, 0); err != nil || n != len(g) {
		fmt.Fprintln(os.Stderr, "getrandom:", n, err)
		os.Exit(1)
	}
	fmt.Printf("urandom=%s getrandom=%s now=%d\n", hex.EncodeToString(u), hex.EncodeToString(g), time.Now().UnixNano())
}
