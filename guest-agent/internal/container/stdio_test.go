package container

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestGrowPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if err := growPipe(r); err != nil {
		t.Fatalf("growPipe: %v", err)
	}
	rc, _ := r.SyscallConn()
	var size int
	var gerr error
	rc.Control(func(fd uintptr) { size, gerr = unix.FcntlInt(fd, unix.F_GETPIPE_SZ, 0) })
	if gerr != nil || size < stdioPipeSize {
		t.Errorf("pipe size after growPipe = %d (%v), want >= %d", size, gerr, stdioPipeSize)
	}
	// The read end must still be on the poller: a deadline interrupts a read.
	if err := r.SetReadDeadline(time.Now().Add(20 * time.Millisecond)); err != nil {
		t.Fatalf("SetReadDeadline after growPipe: %v", err)
	}
	if _, err := r.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read of an empty pipe past its deadline: %v, want ErrDeadlineExceeded", err)
	}
}

// chunkRecorder keeps what is written and the size of each write.
type chunkRecorder struct {
	mu     sync.Mutex // guards buf and chunks
	buf    bytes.Buffer
	chunks []int
}

func (c *chunkRecorder) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.chunks = append(c.chunks, len(p))
	return c.buf.Write(p)
}

// ReadFrom would let io.CopyBuffer bypass the buffer; copyStream must not use it.
func (c *chunkRecorder) ReadFrom(r io.Reader) (int64, error) { panic("ReadFrom used") }

func TestCopyOutput(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := growPipe(r); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 3<<20+12345)
	rand.NewChaCha8([32]byte{1}).Read(data)
	// The first MiB is in the pipe before copying starts, so the first read
	// finds more than a default pipe could hold.
	if _, err := w.Write(data[:stdioPipeSize]); err != nil {
		t.Fatal(err)
	}
	go func() {
		w.Write(data[stdioPipeSize:])
		w.Close()
	}()
	// src is the *os.File itself (it has a WriteTo), dst has a ReadFrom:
	// neither may bypass the buffer.
	var rec chunkRecorder
	n, err := copyStream(&rec, r)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("copyStream = %d, %v; want %d, nil", n, err, len(data))
	}
	if !bytes.Equal(rec.buf.Bytes(), data) {
		t.Fatal("copied bytes differ from the input")
	}
	if rec.chunks[0] != streamCopySize {
		t.Errorf("first write carried %d bytes, want %d (a full copy buffer)", rec.chunks[0], streamCopySize)
	}
}

// TestCopyInput: stdin goes to the pipe in writes as large as what the
// stream delivers, up to one frame, not io.Copy's 32 KiB.
func TestCopyInput(t *testing.T) {
	data := make([]byte, 1<<20+999)
	rand.NewChaCha8([32]byte{3}).Read(data)
	var rec chunkRecorder
	n, err := copyStream(&rec, bytes.NewReader(data))
	if err != nil || n != int64(len(data)) || !bytes.Equal(rec.buf.Bytes(), data) {
		t.Fatalf("copyStream = %d, %v (%d bytes arrived); want %d intact bytes", n, err, rec.buf.Len(), len(data))
	}
	if rec.chunks[0] != streamCopySize {
		t.Errorf("first write carried %d bytes, want %d", rec.chunks[0], streamCopySize)
	}
}
