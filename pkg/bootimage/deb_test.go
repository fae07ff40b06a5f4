package bootimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// testDeb builds a .deb the way dpkg-deb lays it out: an ar archive with
// debian-binary, control.tar.COMP and data.tar.COMP.
func testDeb(t *testing.T, comp string, control string, files map[string][]byte) []byte {
	t.Helper()
	tarOf := func(files map[string][]byte) []byte {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		tw.WriteHeader(&tar.Header{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755})
		for name, data := range files {
			if err := tw.WriteHeader(&tar.Header{Name: "./" + name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(data))}); err != nil {
				t.Fatal(err)
			}
			tw.Write(data)
		}
		tw.Close()
		return compress(t, comp, b.Bytes())
	}
	var ar bytes.Buffer
	ar.WriteString(arMagic)
	member := func(name string, data []byte) {
		fmt.Fprintf(&ar, "%-16s%-12d%-6d%-6d%-8s%-10d`\n", name, 0, 0, 0, "100644", len(data))
		ar.Write(data)
		if len(data)%2 == 1 {
			ar.WriteByte('\n')
		}
	}
	member("debian-binary", []byte("2.0\n"))
	suffix := map[string]string{"xz": ".xz", "zst": ".zst", "gz": ".gz", "none": ""}[comp]
	member("control.tar"+suffix, tarOf(map[string][]byte{"control": []byte(control)}))
	member("data.tar"+suffix, tarOf(files))
	return ar.Bytes()
}

func compress(t *testing.T, comp string, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	var w io.WriteCloser
	var err error
	switch comp {
	case "none":
		return b
	case "xz":
		w, err = xz.NewWriter(&out)
	case "zst":
		w, err = zstd.NewWriter(&out)
	case "gz":
		w = gzip.NewWriter(&out)
	}
	if err != nil {
		t.Fatal(err)
	}
	w.Write(b)
	w.Close()
	return out.Bytes()
}

func TestWalkDeb(t *testing.T) {
	files := map[string][]byte{
		"boot/vmlinuz-6.1.0-9-arm64":                   []byte("kernel"),
		"lib/modules/6.1.0-9-arm64/kernel/a/odd.ko":    []byte("odd length!"),
		"lib/modules/6.1.0-9-arm64/modules.builtin":    []byte("kernel/fs/ext4/ext4.ko\n"),
		"usr/share/doc/linux-image-6.1.0-9-arm64/copy": []byte("x"),
	}
	control := "Package: linux-image-6.1.0-9-arm64\nVersion: 6.1.99-1\nArchitecture: arm64\nDescription: Linux\n multi-line\n"
	for _, comp := range []string{"xz", "zst", "gz", "none"} {
		t.Run(comp, func(t *testing.T) {
			deb := testDeb(t, comp, control, files)
			got := map[string]string{}
			err := WalkDeb(bytes.NewReader(deb), func(hdr *tar.Header, r io.Reader) error {
				if hdr.Typeflag != tar.TypeReg {
					return nil
				}
				b, err := io.ReadAll(r)
				got[hdr.Name] = string(b)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			for name, want := range files {
				if got["./"+name] != string(want) {
					t.Errorf("%s: got %q, want %q", name, got["./"+name], want)
				}
			}
			c, err := DebControl(bytes.NewReader(deb))
			if err != nil {
				t.Fatal(err)
			}
			if c["Package"] != "linux-image-6.1.0-9-arm64" || c["Version"] != "6.1.99-1" || c["Architecture"] != "arm64" {
				t.Errorf("control: %v", c)
			}
		})
	}

	// Stopping early with io.EOF is not an error.
	n := 0
	deb := testDeb(t, "gz", control, files)
	if err := WalkDeb(bytes.NewReader(deb), func(*tar.Header, io.Reader) error { n++; return io.EOF }); err != nil || n != 1 {
		t.Errorf("early stop: n=%d err=%v", n, err)
	}
	if err := WalkDeb(bytes.NewReader([]byte("PK\x03\x04 not a deb")), nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("not a deb: %v", err)
	}
	bz2 := bytes.Replace(testDeb(t, "none", control, files), []byte("data.tar        "), []byte("data.tar.bz2    "), 1)
	if err := WalkDeb(bytes.NewReader(bz2), func(*tar.Header, io.Reader) error { return nil }); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("bz2 data: %v, want ErrNotImplemented", err)
	}
}

// fakeARM64Image is an arm64 Image header (and a body) as the kernel's
// head.S lays it out.
func fakeARM64Image() []byte {
	img := make([]byte, 4096)
	copy(img[0x38:], "ARMd")
	for i := 64; i < len(img); i++ {
		img[i] = byte(i * 7)
	}
	return img
}

func gz(b []byte) []byte {
	var out bytes.Buffer
	w := gzip.NewWriter(&out)
	w.Write(b)
	w.Close()
	return out.Bytes()
}

func TestARM64Image(t *testing.T) {
	img := fakeARM64Image()
	zboot := func(comp string) []byte {
		payload := gz(img)
		h := make([]byte, 64)
		copy(h, "MZ")
		copy(h[4:], "zimg")
		binary.LittleEndian.PutUint32(h[8:], 64)
		binary.LittleEndian.PutUint32(h[12:], uint32(len(payload)))
		copy(h[24:], comp)
		return append(h, payload...)
	}
	for _, tt := range []struct {
		name string
		in   []byte
		want error
	}{
		{"raw Image", img, nil},
		{"gzip Image", append(gz(img), 0, 0, 0, 0), nil}, // padding after the stream
		{"zboot gzip", zboot("gzip"), nil},
		{"zboot zstd", zboot("zstd"), errdefs.ErrNotImplemented},
		{"gzip of something else", gz([]byte("not a kernel at all, but long enough to have an offset 0x38 ......")), errdefs.ErrInvalidArgument},
		{"bzImage", append(make([]byte, 0x202), []byte("HdrS")...), errdefs.ErrNotImplemented},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ARM64Image(tt.in)
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("got %v, want %v", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, img) || !IsARM64Image(got) {
				t.Fatalf("got %d bytes, want the %d-byte Image", len(got), len(img))
			}
		})
	}
	if !IsBzImage(append(make([]byte, 0x202), []byte("HdrS\x00")...)) || IsBzImage(img) {
		t.Error("IsBzImage")
	}
}
