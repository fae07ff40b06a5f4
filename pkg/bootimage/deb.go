package bootimage

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// A Debian package is an ar archive holding debian-binary, control.tar.*
// and data.tar.* (deb(5)); the tars are compressed with xz, zstd, gzip or
// not at all. Everything here is pure Go so that the kernel for macOS
// guests can be prepared on a Mac, which has neither dpkg-deb nor GNU tar.

const (
	arMagic     = "!<arch>\n"
	arHeaderLen = 60
)

// WalkDeb calls fn for every entry of the .deb's data archive, in archive
// order, with a reader of the entry's contents. fn may stop the walk early
// by returning io.EOF, which WalkDeb then returns as nil.
func WalkDeb(r io.Reader, fn func(hdr *tar.Header, content io.Reader) error) error {
	return walkDebMember(r, "data.tar", fn)
}

// DebControl returns the fields of the package's control file (Package,
// Version, Architecture, ...).
func DebControl(r io.Reader) (map[string]string, error) {
	var control []byte
	err := walkDebMember(r, "control.tar", func(hdr *tar.Header, content io.Reader) error {
		if strings.TrimPrefix(hdr.Name, "./") != "control" {
			return nil
		}
		var err error
		control, err = io.ReadAll(content)
		if err != nil {
			return err
		}
		return io.EOF
	})
	if err != nil {
		return nil, err
	}
	if control == nil {
		return nil, fmt.Errorf("deb: no control file: %w", errdefs.ErrNotFound)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(control), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && line[0] != ' ' && line[0] != '\t' {
			fields[k] = strings.TrimSpace(v)
		}
	}
	return fields, nil
}

// walkDebMember finds the ar member whose name starts with prefix
// (data.tar, control.tar) and walks it as a tar.
func walkDebMember(r io.Reader, prefix string, fn func(*tar.Header, io.Reader) error) error {
	br := bufio.NewReader(r)
	magic := make([]byte, len(arMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != arMagic {
		return fmt.Errorf("deb: not an ar archive: %w", errdefs.ErrInvalidArgument)
	}
	hdr := make([]byte, arHeaderLen)
	for {
		if _, err := io.ReadFull(br, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("deb: no %s member: %w", prefix, errdefs.ErrNotFound)
			}
			return fmt.Errorf("deb: ar header: %w", err)
		}
		if string(hdr[58:60]) != "`\n" {
			return fmt.Errorf("deb: corrupt ar header: %w", errdefs.ErrInvalidArgument)
		}
		// GNU ar ends names with '/'; BSD-style long names are not used by dpkg.
		name := strings.TrimRight(strings.TrimSpace(string(hdr[0:16])), "/")
		size, err := strconv.ParseInt(strings.TrimSpace(string(hdr[48:58])), 10, 64)
		if err != nil || size < 0 {
			return fmt.Errorf("deb: ar member %q: bad size: %w", name, errdefs.ErrInvalidArgument)
		}
		body := io.LimitReader(br, size)
		if strings.HasPrefix(name, prefix) {
			return walkTar(name, body, fn)
		}
		// Members are 2-byte aligned.
		if _, err := io.Copy(io.Discard, io.LimitReader(br, size+size%2)); err != nil {
			return fmt.Errorf("deb: skipping %s: %w", name, err)
		}
	}
}

// walkTar decompresses a data.tar.* or control.tar.* member by its suffix
// and walks the tar inside.
func walkTar(name string, r io.Reader, fn func(*tar.Header, io.Reader) error) error {
	var tr io.Reader
	switch {
	case strings.HasSuffix(name, ".tar"):
		tr = r
	case strings.HasSuffix(name, ".xz"):
		x, err := xz.NewReader(r)
		if err != nil {
			return fmt.Errorf("deb: %s: %w", name, err)
		}
		tr = x
	case strings.HasSuffix(name, ".zst"):
		z, err := zstd.NewReader(r)
		if err != nil {
			return fmt.Errorf("deb: %s: %w", name, err)
		}
		defer z.Close()
		tr = z
	case strings.HasSuffix(name, ".gz"):
		g, err := gzip.NewReader(r)
		if err != nil {
			return fmt.Errorf("deb: %s: %w", name, err)
		}
		defer g.Close()
		tr = g
	default:
		return fmt.Errorf("deb: %s: compression: %w", name, ErrUnsupported)
	}
	t := tar.NewReader(tr)
	for {
		hdr, err := t.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("deb: %s: %w", name, err)
		}
		if err := fn(hdr, t); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
	}
}

// arm64 Image header (Documentation/arch/arm64/booting.rst): the magic
// "ARM\x64" at offset 0x38.
const (
	arm64MagicOff = 0x38
	arm64Magic    = "ARMd"
)

// IsARM64Image tells whether b starts with an uncompressed arm64 Image
// header, which is what Virtualization.framework's Linux boot loader
// needs: it boots neither gzip nor EFI zboot kernels.
func IsARM64Image(b []byte) bool {
	return len(b) >= arm64MagicOff+4 && string(b[arm64MagicOff:arm64MagicOff+4]) == arm64Magic
}

// ARM64Image returns the uncompressed arm64 Image inside a distribution's
// vmlinuz: an Image as is, a gzip-compressed Image (Debian's arm64
// kernels), or an EFI zboot image ("zimg") with a gzip payload.
func ARM64Image(vmlinuz []byte) ([]byte, error) {
	var img []byte
	switch {
	case IsARM64Image(vmlinuz):
		return vmlinuz, nil
	case bytes.HasPrefix(vmlinuz, magicGzip):
		var err error
		if img, err = gunzip(vmlinuz); err != nil {
			return nil, err
		}
	case len(vmlinuz) >= 64 && string(vmlinuz[0:2]) == "MZ" && string(vmlinuz[4:8]) == "zimg":
		// EFI zboot: payload offset and size at 8 and 12, the
		// compression name at 24 (drivers/firmware/efi/libstub/zboot-header.S).
		off := int(uint32(vmlinuz[8]) | uint32(vmlinuz[9])<<8 | uint32(vmlinuz[10])<<16 | uint32(vmlinuz[11])<<24)
		size := int(uint32(vmlinuz[12]) | uint32(vmlinuz[13])<<8 | uint32(vmlinuz[14])<<16 | uint32(vmlinuz[15])<<24)
		comp := string(bytes.TrimRight(vmlinuz[24:32], "\x00"))
		if off < 0 || size < 0 || off+size > len(vmlinuz) {
			return nil, fmt.Errorf("arm64 zboot image: payload %d+%d outside %d bytes: %w", off, size, len(vmlinuz), errdefs.ErrInvalidArgument)
		}
		if comp != "gzip" {
			return nil, fmt.Errorf("arm64 zboot image compressed with %q: %w", comp, ErrUnsupported)
		}
		var err error
		if img, err = gunzip(vmlinuz[off : off+size]); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("not an arm64 Image, gzip'd Image or zboot image (%s): %w", compressionName(vmlinuz), ErrUnsupported)
	}
	if !IsARM64Image(img) {
		return nil, fmt.Errorf("decompressed kernel has no arm64 Image magic %q at %#x: %w", arm64Magic, arm64MagicOff, errdefs.ErrInvalidArgument)
	}
	return img, nil
}

func gunzip(b []byte) ([]byte, error) {
	g, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("gunzip kernel: %w", err)
	}
	defer g.Close()
	// The kernel's gzip stream may be followed by padding; stop at its end.
	g.Multistream(false)
	out, err := io.ReadAll(g)
	if err != nil {
		return nil, fmt.Errorf("gunzip kernel: %w", err)
	}
	return out, nil
}

// IsBzImage tells whether b is an x86 bzImage (boot protocol header "HdrS"),
// which Virtualization.framework boots on Intel Macs.
func IsBzImage(b []byte) bool {
	return len(b) > bootHeaderMagic+4 && string(b[bootHeaderMagic:bootHeaderMagic+4]) == "HdrS"
}
