package bootimage

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/containerd/errdefs"
)

// ErrUnsupported is wrapped when an image uses a format this package does
// not decode (a compression method, an XZ filter).
var ErrUnsupported = fmt.Errorf("unsupported image format: %w", errdefs.ErrNotImplemented)

// x86 boot protocol offsets (Documentation/arch/x86/boot.rst).
const (
	bootSetupSects   = 0x1f1
	bootHeaderMagic  = 0x202 // "HdrS"
	bootVersion      = 0x206
	bootPayloadOff   = 0x248
	bootPayloadLen   = 0x24c
	minPayloadFields = 0x208 // boot protocol 2.08 added payload_offset/length
)

// compression magics as scripts/extract-vmlinux looks for them.
var (
	magicGzip = []byte{0x1f, 0x8b}
	magicXZ   = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	magicZstd = []byte{0x28, 0xb5, 0x2f, 0xfd}
	magicLZ4  = []byte{0x02, 0x21, 0x4c, 0x18}
	magicLZMA = []byte{0x5d, 0x00, 0x00}
	magicBz2  = []byte{'B', 'Z', 'h'}
	magicLZO  = []byte{0x89, 'L', 'Z', 'O'}
	magicELF  = []byte{0x7f, 'E', 'L', 'F'}
)

// ExtractVmlinux returns the uncompressed ELF kernel inside an x86 bzImage
// (the form distributions ship as /boot/vmlinuz-*). QEMU boots that ELF
// through its PVH entry point, skipping the real-mode setup and the
// in-guest decompressor: about a second saved per boot under TCG. An
// input that already is an ELF is returned unchanged.
func ExtractVmlinux(image []byte) ([]byte, error) {
	if bytes.HasPrefix(image, magicELF) {
		return image, nil
	}
	if len(image) < minPayloadFields+0x50 || string(image[bootHeaderMagic:bootHeaderMagic+4]) != "HdrS" {
		return nil, fmt.Errorf("not a bzImage (no HdrS boot header): %w", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(image[bootVersion:]); v < minPayloadFields {
		return nil, fmt.Errorf("boot protocol %#x predates payload fields: %w", v, ErrUnsupported)
	}
	setupSects := int(image[bootSetupSects])
	if setupSects == 0 {
		setupSects = 4 // boot.rst: 0 means 4
	}
	start := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(image[bootPayloadOff:]))
	length := int(binary.LittleEndian.Uint32(image[bootPayloadLen:]))
	if start < 0 || length <= 0 || start+length > len(image) {
		return nil, fmt.Errorf("bzImage payload [%d, +%d) outside the %d-byte file: %w", start, length, len(image), ErrCorrupt)
	}
	payload := image[start : start+length]

	var (
		out []byte
		err error
	)
	switch {
	case bytes.HasPrefix(payload, magicXZ):
		out, err = DecompressXZ(payload)
	case bytes.HasPrefix(payload, magicGzip):
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
			// The build appends the uncompressed size after the
			// stream; stop at the end of the first member.
			zr.Multistream(false)
			out, err = io.ReadAll(zr)
		}
	default:
		return nil, fmt.Errorf("bzImage payload compressed with %s: %w", compressionName(payload), ErrUnsupported)
	}
	if err != nil {
		return nil, fmt.Errorf("decompressing bzImage payload: %w", err)
	}
	if !bytes.HasPrefix(out, magicELF) {
		return nil, fmt.Errorf("bzImage payload is not an ELF: %w", ErrCorrupt)
	}
	return trimELF(out)
}

// trimELF cuts what the kernel build appends after vmlinux inside the
// payload (the relocation table used by the in-guest decompressor), which
// a PVH boot does not need.
func trimELF(b []byte) ([]byte, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parsing vmlinux: %w: %w", ErrCorrupt, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 && f.Machine != elf.EM_386 {
		return nil, fmt.Errorf("vmlinux is for %s, not x86: %w", f.Machine, ErrUnsupported)
	}
	end := uint64(0)
	grow := func(v uint64) {
		if v > end {
			end = v
		}
	}
	for _, p := range f.Progs {
		grow(p.Off + p.Filesz)
	}
	for _, s := range f.Sections {
		if s.Type != elf.SHT_NOBITS {
			grow(s.Offset + s.FileSize)
		}
	}
	// The section header table itself; debug/elf does not expose its
	// offset, so read it from the ELF64/ELF32 header.
	switch f.Class {
	case elf.ELFCLASS64:
		shoff := binary.LittleEndian.Uint64(b[0x28:])
		shentsize := uint64(binary.LittleEndian.Uint16(b[0x3a:]))
		shnum := uint64(binary.LittleEndian.Uint16(b[0x3c:]))
		grow(shoff + shentsize*shnum)
	case elf.ELFCLASS32:
		shoff := uint64(binary.LittleEndian.Uint32(b[0x20:]))
		shentsize := uint64(binary.LittleEndian.Uint16(b[0x2e:]))
		shnum := uint64(binary.LittleEndian.Uint16(b[0x30:]))
		grow(shoff + shentsize*shnum)
	}
	if end == 0 || end > uint64(len(b)) {
		return nil, fmt.Errorf("vmlinux extends past its %d bytes (%d): %w", len(b), end, ErrCorrupt)
	}
	return b[:end], nil
}

func compressionName(b []byte) string {
	for _, c := range []struct {
		magic []byte
		name  string
	}{
		{magicZstd, "zstd"}, {magicLZ4, "lz4"}, {magicLZMA, "lzma"}, {magicBz2, "bzip2"}, {magicLZO, "lzo"},
	} {
		if bytes.HasPrefix(b, c.magic) {
			return c.name
		}
	}
	n := min(len(b), 6)
	return fmt.Sprintf("an unknown method (magic %x)", b[:n])
}
