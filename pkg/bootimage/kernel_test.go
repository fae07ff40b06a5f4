package bootimage

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"os"
	"os/exec"
	"testing"

	"github.com/containerd/errdefs"
)

// testCode returns real x86-64 machine code (this test binary), so the
// BCJ filter has CALL/JMP instructions to convert.
func testCode(t *testing.T, n int) []byte {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > n {
		b = b[:n]
	}
	return b
}

// xzCompress runs the xz tool (installed by hack/with-deps) the way the
// kernel build does for x86: BCJ x86 then LZMA2.
func xzCompress(t *testing.T, data []byte, args ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath("xz"); err != nil {
		t.Fatalf("these tests need the xz tool (Debian package xz-utils, installed by hack/with-deps): %v", err)
	}
	cmd := exec.Command("xz", append([]string{"--format=xz", "--stdout", "-T1"}, args...)...)
	cmd.Stdin = bytes.NewReader(data)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("xz %v: %v: %s", args, err, stderr.String())
	}
	return out.Bytes()
}

func TestDecompressXZ(t *testing.T) {
	code := testCode(t, 3<<20)
	tests := []struct {
		name string
		args []string
	}{
		{"kernel style: x86 BCJ + LZMA2, CRC32", []string{"--check=crc32", "--x86", "--lzma2=preset=1,dict=1MiB"}},
		{"BCJ with a start offset, CRC64", []string{"--check=crc64", "--x86=start=4096", "--lzma2=preset=0"}},
		{"plain LZMA2, SHA-256", []string{"--check=sha256", "-0"}},
		{"no check", []string{"--check=none", "--x86", "--lzma2=preset=0"}},
		{"several blocks", []string{"--check=crc32", "--x86", "--lzma2=preset=0", "--block-size=300000"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			z := xzCompress(t, code, tc.args...)
			// The kernel appends the uncompressed size after the stream.
			z = binary.LittleEndian.AppendUint32(z, uint32(len(code)))
			got, err := DecompressXZ(z)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, code) {
				t.Fatalf("round trip differs (got %d bytes, want %d)", len(got), len(code))
			}
		})
	}

	z := xzCompress(t, code[:100000], "--check=crc32", "--x86", "--lzma2=preset=0")
	corrupt := append([]byte{}, z...)
	corrupt[len(corrupt)/2] ^= 0x55
	if _, err := DecompressXZ(corrupt); !errdefs.IsDataLoss(err) {
		t.Errorf("corrupted stream: got %v, want ErrDataLoss", err)
	}
	arm := xzCompress(t, code[:100000], "--check=crc32", "--arm", "--lzma2=preset=0")
	if _, err := DecompressXZ(arm); !errdefs.IsNotImplemented(err) {
		t.Errorf("ARM BCJ filter: got %v, want ErrNotImplemented", err)
	}
}

// fakeBzImage wraps a compressed payload in the x86 boot header fields
// ExtractVmlinux reads.
func fakeBzImage(payload []byte) []byte {
	const setupSects = 3
	img := make([]byte, (setupSects+1)*512)
	img[bootSetupSects] = setupSects
	copy(img[bootHeaderMagic:], "HdrS")
	binary.LittleEndian.PutUint16(img[bootVersion:], 0x20f)
	const payloadOff = 0x3a0 // from the start of the protected-mode code
	binary.LittleEndian.PutUint32(img[bootPayloadOff:], payloadOff)
	binary.LittleEndian.PutUint32(img[bootPayloadLen:], uint32(len(payload)))
	img = append(img, make([]byte, payloadOff)...)
	img = append(img, payload...)
	return append(img, make([]byte, 4096)...) // the rest of the decompressor
}

func TestExtractVmlinux(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	elfImage, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	// The build appends relocations after vmlinux inside the payload.
	withRelocs := append(append([]byte{}, elfImage...), bytes.Repeat([]byte{0xaa}, 1000)...)

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(withRelocs)
	zw.Close()
	gzPayload := binary.LittleEndian.AppendUint32(gz.Bytes(), uint32(len(withRelocs)))
	xzPayload := xzCompress(t, withRelocs, "--check=crc32", "--x86", "--lzma2=preset=0")

	for name, payload := range map[string][]byte{"xz": xzPayload, "gzip": gzPayload} {
		t.Run(name, func(t *testing.T) {
			got, err := ExtractVmlinux(fakeBzImage(payload))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, elfImage) {
				t.Fatalf("extracted %d bytes, want the %d-byte ELF without the trailer", len(got), len(elfImage))
			}
		})
	}

	if got, err := ExtractVmlinux(elfImage); err != nil || len(got) != len(elfImage) {
		t.Errorf("an ELF input is returned as is: got %d bytes, %v", len(got), err)
	}
	zstd := fakeBzImage([]byte{0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4})
	if _, err := ExtractVmlinux(zstd); !errdefs.IsNotImplemented(err) {
		t.Errorf("zstd payload: got %v, want ErrNotImplemented", err)
	}
	if _, err := ExtractVmlinux(make([]byte, 8192)); !errdefs.IsDataLoss(err) {
		t.Errorf("not a bzImage: got %v, want ErrDataLoss", err)
	}
}
