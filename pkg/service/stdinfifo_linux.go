package service

import (
	"os"

	"golang.org/x/sys/unix"
)

// stdinFifoSize is the capacity asked for a stdin FIFO: with Linux's
// default 64 KiB a read rarely finds more than that, however far the client
// is ahead, and every read becomes one transport frame that the guest pays
// for per frame (see copyStdin).
const stdinFifoSize = 1 << 20

// growStdinFifo raises the capacity of the stdin FIFO f. It is best effort:
// a smaller FIFO only means smaller frames.
func growStdinFifo(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, stdinFifoSize)
	})
}
