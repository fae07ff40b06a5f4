package bootimage

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"
	"hash/crc64"
	"io"

	"github.com/ulikunitz/xz/lzma"
)

// XZ filter IDs (xz-file-format.txt, section 5.3).
const (
	xzFilterX86   = 0x04
	xzFilterLZMA2 = 0x21
)

// DecompressXZ decodes a single-stream .xz buffer whose blocks use LZMA2,
// optionally preceded by the x86 BCJ filter. The kernel build compresses
// x86 kernels with `xz --x86 --lzma2`; github.com/ulikunitz/xz decodes
// LZMA2 but rejects BCJ filters, so this walks the container itself,
// lets ulikunitz/xz/lzma decode each block's LZMA2 data, and undoes the
// BCJ filter here. The block's integrity check is verified, which also
// proves the filter code right. Trailing bytes after the stream (the
// kernel appends the uncompressed size) are ignored.
func DecompressXZ(b []byte) ([]byte, error) {
	if len(b) < 12 || !bytes.HasPrefix(b, magicXZ) {
		return nil, fmt.Errorf("xz: no stream header: %w", ErrCorrupt)
	}
	if crc32.ChecksumIEEE(b[6:8]) != binary.LittleEndian.Uint32(b[8:12]) {
		return nil, fmt.Errorf("xz: stream header CRC mismatch: %w", ErrCorrupt)
	}
	if b[6] != 0 {
		return nil, fmt.Errorf("xz: reserved stream flags %#x: %w", b[6], ErrUnsupported)
	}
	checkType := b[7] & 0x0f
	newCheck, checkSize, err := xzCheck(checkType)
	if err != nil {
		return nil, err
	}

	var out []byte
	pos := 12
	for {
		if pos >= len(b) {
			return nil, fmt.Errorf("xz: truncated before index: %w", ErrCorrupt)
		}
		if b[pos] == 0 { // index indicator: no more blocks
			break
		}
		block, n, err := decodeXZBlock(b[pos:], checkSize, newCheck)
		if err != nil {
			return nil, fmt.Errorf("xz block at %d: %w", pos, err)
		}
		out = append(out, block...)
		pos += n
	}
	return out, nil
}

func xzCheck(t byte) (func() hash.Hash, int, error) {
	switch t {
	case 0x00:
		return nil, 0, nil
	case 0x01:
		return func() hash.Hash { return crc32.NewIEEE() }, 4, nil
	case 0x04:
		return func() hash.Hash { return crc64.New(crc64.MakeTable(crc64.ECMA)) }, 8, nil
	case 0x0a:
		return sha256.New, 32, nil
	}
	return nil, 0, fmt.Errorf("xz: check type %#x: %w", t, ErrUnsupported)
}

// decodeXZBlock decodes one block and returns its data and its size in
// the file (header, data, padding and check).
func decodeXZBlock(b []byte, checkSize int, newCheck func() hash.Hash) ([]byte, int, error) {
	hdrSize := (int(b[0]) + 1) * 4
	if hdrSize > len(b) {
		return nil, 0, fmt.Errorf("header size %d past end: %w", hdrSize, ErrCorrupt)
	}
	hdr := b[:hdrSize]
	if crc32.ChecksumIEEE(hdr[:hdrSize-4]) != binary.LittleEndian.Uint32(hdr[hdrSize-4:]) {
		return nil, 0, fmt.Errorf("header CRC mismatch: %w", ErrCorrupt)
	}
	flags := hdr[1]
	if flags&0x3c != 0 {
		return nil, 0, fmt.Errorf("reserved block flags %#x: %w", flags, ErrUnsupported)
	}
	r := bytes.NewReader(hdr[2 : hdrSize-4])
	compressedSize, uncompressedSize := int64(-1), int64(-1)
	if flags&0x40 != 0 {
		v, err := binary.ReadUvarint(r)
		if err != nil {
			return nil, 0, fmt.Errorf("compressed size: %w: %w", ErrCorrupt, err)
		}
		compressedSize = int64(v)
	}
	if flags&0x80 != 0 {
		v, err := binary.ReadUvarint(r)
		if err != nil {
			return nil, 0, fmt.Errorf("uncompressed size: %w: %w", ErrCorrupt, err)
		}
		uncompressedSize = int64(v)
	}
	nFilters := int(flags&0x03) + 1
	var (
		x86      bool
		x86Start uint32
		dictCap  = -1
	)
	for i := 0; i < nFilters; i++ {
		id, err1 := binary.ReadUvarint(r)
		propSize, err2 := binary.ReadUvarint(r)
		if err1 != nil || err2 != nil || propSize > uint64(r.Len()) {
			return nil, 0, fmt.Errorf("filter flags: %w", ErrCorrupt)
		}
		props := make([]byte, propSize)
		_, _ = io.ReadFull(r, props)
		last := i == nFilters-1
		switch {
		case id == xzFilterX86 && !last && !x86:
			x86 = true
			switch propSize {
			case 0:
			case 4:
				x86Start = binary.LittleEndian.Uint32(props)
			default:
				return nil, 0, fmt.Errorf("x86 filter properties of %d bytes: %w", propSize, ErrCorrupt)
			}
		case id == xzFilterLZMA2 && last:
			if propSize != 1 || props[0] > 40 {
				return nil, 0, fmt.Errorf("LZMA2 properties %x: %w", props, ErrCorrupt)
			}
			dictCap = lzma2DictSize(props[0])
		default:
			return nil, 0, fmt.Errorf("filter %#x in position %d of %d: %w", id, i+1, nFilters, ErrUnsupported)
		}
	}

	// The LZMA2 reader stops at its end marker; count what it consumed
	// to find the padding and the check that follow the data.
	body := b[hdrSize:]
	cr := &countingReader{r: bytes.NewReader(body)}
	lr, err := lzma.Reader2Config{DictCap: max(dictCap, lzma.MinDictCap)}.NewReader2(cr)
	if err != nil {
		return nil, 0, fmt.Errorf("LZMA2: %w: %w", ErrCorrupt, err)
	}
	var buf bytes.Buffer
	if uncompressedSize > 0 {
		buf.Grow(int(uncompressedSize))
	}
	if _, err := io.Copy(&buf, lr); err != nil {
		return nil, 0, fmt.Errorf("LZMA2: %w: %w", ErrCorrupt, err)
	}
	out := buf.Bytes()
	// lzma's Reader2 reads its input one byte at a time through
	// io.ByteReader when it has one, so the count is exact.
	consumed := int(cr.n)
	if compressedSize >= 0 && int64(consumed) != compressedSize {
		return nil, 0, fmt.Errorf("compressed size %d, header says %d: %w", consumed, compressedSize, ErrCorrupt)
	}
	if uncompressedSize >= 0 && int64(len(out)) != uncompressedSize {
		return nil, 0, fmt.Errorf("uncompressed size %d, header says %d: %w", len(out), uncompressedSize, ErrCorrupt)
	}
	if x86 {
		bcjX86Decode(out, x86Start)
	}
	checkOff := consumed + pad4(hdrSize+consumed)
	if checkOff+checkSize > len(body) {
		return nil, 0, fmt.Errorf("check past end: %w", ErrCorrupt)
	}
	if newCheck != nil {
		h := newCheck()
		h.Write(out)
		sum := h.Sum(nil)
		stored := body[checkOff : checkOff+checkSize]
		// CRC32 and CRC64 are stored little endian, SHA-256 as bytes.
		if checkSize <= 8 {
			for i, j := 0, len(sum)-1; i < j; i, j = i+1, j-1 {
				sum[i], sum[j] = sum[j], sum[i]
			}
		}
		if !bytes.Equal(sum, stored) {
			return nil, 0, fmt.Errorf("integrity check mismatch: %w", ErrCorrupt)
		}
	}
	return out, hdrSize + checkOff + checkSize, nil
}

// lzma2DictSize decodes the one-byte LZMA2 dictionary size property.
func lzma2DictSize(p byte) int {
	if p == 40 {
		return 0xffffffff
	}
	return (2 | int(p&1)) << (p/2 + 11)
}

type countingReader struct {
	r *bytes.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (c *countingReader) ReadByte() (byte, error) {
	b, err := c.r.ReadByte()
	if err == nil {
		c.n++
	}
	return b, err
}

// bcjX86Decode undoes the x86 branch/call/jump filter in place: the
// encoder turned the relative targets of E8/E9 instructions into absolute
// ones so they compress better. This follows the reference decoder's
// state machine (the previous-match mask decides which E8/E9 bytes are
// real opcodes). start is the filter's start offset property.
func bcjX86Decode(buf []byte, start uint32) {
	maskToAllowed := [8]bool{true, true, true, false, true, false, false, false}
	maskToBitNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	testMSByte := func(b byte) bool { return b == 0x00 || b == 0xff }

	if len(buf) <= 4 {
		return
	}
	size := len(buf) - 4
	prevPos := -1
	prevMask := uint32(0)
	for i := 0; i < size; i++ {
		if buf[i]&0xfe != 0xe8 {
			continue
		}
		d := i - prevPos
		if d > 3 {
			prevMask = 0
		} else {
			prevMask = (prevMask << (d - 1)) & 7
			if prevMask != 0 {
				b := buf[i+4-int(maskToBitNum[prevMask])]
				if !maskToAllowed[prevMask] || testMSByte(b) {
					prevPos = i
					prevMask = prevMask<<1 | 1
					continue
				}
			}
		}
		prevPos = i
		if !testMSByte(buf[i+4]) {
			prevMask = prevMask<<1 | 1
			continue
		}
		src := binary.LittleEndian.Uint32(buf[i+1:])
		var dest uint32
		for {
			dest = src - (start + uint32(i) + 5)
			if prevMask == 0 {
				break
			}
			j := maskToBitNum[prevMask] * 8
			if !testMSByte(byte(dest >> (24 - j))) {
				break
			}
			src = dest ^ (1<<(32-j) - 1)
		}
		dest &= 0x01ffffff
		dest |= 0 - (dest & 0x01000000)
		binary.LittleEndian.PutUint32(buf[i+1:], dest)
		i += 4
	}
}
