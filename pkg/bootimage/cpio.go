// Package bootimage builds what a macvm guest boots from: the uncompressed
// kernel (extracted from a distribution bzImage so QEMU can boot it through
// PVH) and the initramfs that carries the guest agent as /init plus the
// kernel modules it loads. Everything is pure Go so the boot files can be
// produced on any host (including macOS) without cpio, xz or depmod.
package bootimage

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"

	"github.com/containerd/errdefs"
)

// newc ("new ASCII") is the only cpio flavour the kernel's initramfs
// unpacker understands besides the CRC variant; its header is 110 bytes of
// hex fields followed by the name and the data, each padded to 4 bytes.
const (
	newcMagic      = "070701"
	newcHeaderSize = 110
	cpioTrailer    = "TRAILER!!!"
)

// Linux mode bits as they appear in a cpio header; io/fs encodes the file
// type differently, so we translate explicitly rather than cast.
const (
	modeTypeMask = 0o170000
	modeDir      = 0o040000
	modeRegular  = 0o100000
	modeSymlink  = 0o120000
	modeCharDev  = 0o020000
)

// CPIOEntry is one member of a newc archive.
type CPIOEntry struct {
	// Name is the path inside the archive, without a leading slash
	// (the kernel unpacks relative to the root).
	Name string
	// Mode holds the Linux type and permission bits (e.g. 0o100755).
	Mode uint32
	UID  uint32
	GID  uint32
	// Mtime is seconds since the epoch; the writer's callers keep it 0
	// so images are reproducible.
	Mtime uint32
	// RdevMajor and RdevMinor are set for device nodes.
	RdevMajor uint32
	RdevMinor uint32
	// Data is the file content, or the target for a symlink.
	Data []byte
}

// IsDir reports whether the entry is a directory.
func (e CPIOEntry) IsDir() bool { return e.Mode&modeTypeMask == modeDir }

// FileMode converts the entry's Linux mode to an io/fs mode, for callers
// that compare with files on disk.
func (e CPIOEntry) FileMode() fs.FileMode {
	m := fs.FileMode(e.Mode & 0o777)
	switch e.Mode & modeTypeMask {
	case modeDir:
		m |= fs.ModeDir
	case modeSymlink:
		m |= fs.ModeSymlink
	case modeCharDev:
		m |= fs.ModeDevice | fs.ModeCharDevice
	}
	return m
}

// CPIOWriter writes a newc archive. It assigns inode numbers itself so
// that no two entries look like hard links to the kernel's unpacker.
type CPIOWriter struct {
	w      *bufio.Writer
	ino    uint32
	closed bool
}

// NewCPIOWriter returns a writer that emits a newc archive to w. Close
// must be called to append the trailer.
func NewCPIOWriter(w io.Writer) *CPIOWriter {
	return &CPIOWriter{w: bufio.NewWriterSize(w, 1<<20), ino: 1}
}

// WriteEntry appends one member.
func (c *CPIOWriter) WriteEntry(e CPIOEntry) error {
	if c.closed {
		return fmt.Errorf("cpio: write after close: %w", errdefs.ErrFailedPrecondition)
	}
	if e.Name == "" || e.Name == cpioTrailer {
		return fmt.Errorf("cpio: invalid entry name %q: %w", e.Name, errdefs.ErrInvalidArgument)
	}
	nlink := uint32(1)
	if e.IsDir() {
		nlink = 2
	}
	if err := c.writeHeader(e, c.ino, nlink); err != nil {
		return err
	}
	c.ino++
	return nil
}

func (c *CPIOWriter) writeHeader(e CPIOEntry, ino, nlink uint32) error {
	fields := []uint32{
		ino, e.Mode, e.UID, e.GID, nlink, e.Mtime, uint32(len(e.Data)),
		0, 0, e.RdevMajor, e.RdevMinor, uint32(len(e.Name) + 1), 0,
	}
	if uint64(len(e.Data)) > 0xffffffff {
		return fmt.Errorf("cpio: %s is larger than 4 GiB: %w", e.Name, errdefs.ErrInvalidArgument)
	}
	buf := make([]byte, 0, newcHeaderSize+len(e.Name)+4)
	buf = append(buf, newcMagic...)
	for _, f := range fields {
		buf = append(buf, fmt.Sprintf("%08x", f)...)
	}
	buf = append(buf, e.Name...)
	buf = append(buf, 0)
	buf = append(buf, make([]byte, pad4(len(buf)))...)
	if _, err := c.w.Write(buf); err != nil {
		return err
	}
	if _, err := c.w.Write(e.Data); err != nil {
		return err
	}
	_, err := c.w.Write(make([]byte, pad4(len(e.Data))))
	return err
}

// Close writes the trailer and flushes; it does not close the underlying
// writer.
func (c *CPIOWriter) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	if err := c.writeHeader(CPIOEntry{Name: cpioTrailer}, 0, 1); err != nil {
		return err
	}
	return c.w.Flush()
}

func pad4(n int) int { return (4 - n%4) % 4 }

// CPIOReader reads a newc archive. It exists so tests (and the
// macvm-mkinitrd -list option) can check what an image holds without an
// external cpio binary.
type CPIOReader struct {
	r   *bufio.Reader
	off int64
}

// NewCPIOReader returns a reader over a newc archive.
func NewCPIOReader(r io.Reader) *CPIOReader {
	return &CPIOReader{r: bufio.NewReader(r)}
}

// ErrCorrupt is wrapped by every error about a malformed archive or image.
var ErrCorrupt = fmt.Errorf("corrupt image: %w", errdefs.ErrDataLoss)

// Next returns the next member, or io.EOF after the trailer.
func (c *CPIOReader) Next() (*CPIOEntry, error) {
	hdr := make([]byte, newcHeaderSize)
	if err := c.read(hdr); err != nil {
		if errors.Is(err, io.EOF) && c.off == 0 {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("cpio header at %d: %w: %w", c.off, ErrCorrupt, err)
	}
	if string(hdr[:6]) != newcMagic {
		return nil, fmt.Errorf("cpio: bad magic %q at %d: %w", hdr[:6], c.off-newcHeaderSize, ErrCorrupt)
	}
	var f [13]uint32
	for i := range f {
		v, err := strconv.ParseUint(string(hdr[6+8*i:14+8*i]), 16, 32)
		if err != nil {
			return nil, fmt.Errorf("cpio: field %d: %w: %v", i, ErrCorrupt, err)
		}
		f[i] = uint32(v)
	}
	nameSize := int(f[11])
	if nameSize == 0 || nameSize > 4096 {
		return nil, fmt.Errorf("cpio: name size %d: %w", nameSize, ErrCorrupt)
	}
	name := make([]byte, nameSize+pad4(newcHeaderSize+nameSize))
	if err := c.read(name); err != nil {
		return nil, fmt.Errorf("cpio: name: %w: %w", ErrCorrupt, err)
	}
	e := &CPIOEntry{
		Name: string(name[:nameSize-1]), Mode: f[1], UID: f[2], GID: f[3], Mtime: f[5],
		RdevMajor: f[9], RdevMinor: f[10],
	}
	if e.Name == cpioTrailer {
		return nil, io.EOF
	}
	size := int(f[6])
	data := make([]byte, size+pad4(size))
	if err := c.read(data); err != nil {
		return nil, fmt.Errorf("cpio: data of %s: %w: %w", e.Name, ErrCorrupt, err)
	}
	e.Data = data[:size]
	return e, nil
}

func (c *CPIOReader) read(b []byte) error {
	n, err := io.ReadFull(c.r, b)
	c.off += int64(n)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
