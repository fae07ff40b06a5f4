package bootimage

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// writeFakeModule writes a minimal ELF64 relocatable object whose only
// content is a .modinfo section, which is all ReadModule looks at.
func writeFakeModule(t *testing.T, path string, modinfo ...string) {
	t.Helper()
	var info []byte
	for _, kv := range modinfo {
		info = append(info, kv...)
		info = append(info, 0)
	}
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehSize, shEntSize = 64, 64
	infoOff := ehSize
	shstrOff := infoOff + len(info)
	shOff := (shstrOff + len(shstr) + 7) &^ 7

	var b bytes.Buffer
	le := binary.LittleEndian
	hdr := make([]byte, ehSize)
	copy(hdr, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	le.PutUint16(hdr[16:], 1)    // ET_REL
	le.PutUint16(hdr[18:], 0x3e) // EM_X86_64
	le.PutUint32(hdr[20:], 1)
	le.PutUint64(hdr[40:], uint64(shOff))
	le.PutUint16(hdr[52:], ehSize)
	le.PutUint16(hdr[58:], shEntSize)
	le.PutUint16(hdr[60:], 3) // sections: null, .modinfo, .shstrtab
	le.PutUint16(hdr[62:], 2) // .shstrtab index
	b.Write(hdr)
	b.Write(info)
	b.Write(shstr)
	b.Write(make([]byte, shOff-b.Len()))
	sh := func(name, typ uint32, off, size int) {
		s := make([]byte, shEntSize)
		le.PutUint32(s[0:], name)
		le.PutUint32(s[4:], typ)
		le.PutUint64(s[24:], uint64(off))
		le.PutUint64(s[32:], uint64(size))
		le.PutUint64(s[48:], 1)
		b.Write(s)
	}
	sh(0, 0, 0, 0)
	sh(1, 1, infoOff, len(info))    // SHT_PROGBITS
	sh(10, 3, shstrOff, len(shstr)) // SHT_STRTAB
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestReadModule(t *testing.T) {
	p := filepath.Join(t.TempDir(), "9pnet-virtio.ko")
	writeFakeModule(t, p, "license=GPL", "depends=virtio,9pnet,virtio_ring", "softdep=pre: crc32c post: foo",
		"alias=crypto-crc32c", "name=9pnet_virtio", "vermagic=6.1.0 SMP mod_unload")
	m, err := ReadModule(p)
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "9pnet_virtio" {
		t.Errorf("name: got %q, want 9pnet_virtio", m.Name)
	}
	if got, want := strings.Join(m.Depends, ","), "9pnet,virtio,virtio_ring"; got != want {
		t.Errorf("depends: got %q, want %q", got, want)
	}
	if got, want := strings.Join(m.SoftPre, ","), "crc32c"; got != want {
		t.Errorf("softdep pre: got %q, want %q", got, want)
	}
	if got, want := strings.Join(m.Aliases, ","), "crypto_crc32c"; got != want {
		t.Errorf("aliases: got %q, want %q", got, want)
	}

	notELF := filepath.Join(t.TempDir(), "x.ko")
	if err := os.WriteFile(notELF, []byte("not an elf"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadModule(notELF); !errdefs.IsDataLoss(err) {
		t.Errorf("non-ELF module: got %v, want ErrDataLoss", err)
	}
}

func mod(name string, deps ...string) *Module { return &Module{Name: name, Depends: deps} }

func names(mods []*Module) string {
	var s []string
	for _, m := range mods {
		s = append(s, m.Name)
	}
	return strings.Join(s, " ")
}

func TestLoadOrder(t *testing.T) {
	crc := mod("crc32c_generic")
	crc.Aliases = []string{"crc32c", "crypto_crc32c"}
	libcrc := mod("libcrc32c")
	libcrc.SoftPre = []string{"crc32c"}
	withAbsentSoft := mod("a")
	withAbsentSoft.SoftPre = []string{"not_here"}

	tests := []struct {
		name    string
		mods    []*Module
		want    string
		wantErr func(error) bool
		errHas  string
	}{
		{name: "empty", want: ""},
		{
			name: "virtio console chain",
			mods: []*Module{mod("virtio_console", "virtio", "virtio_ring"), mod("virtio_mmio", "virtio", "virtio_ring"), mod("virtio"), mod("virtio_ring")},
			want: "virtio virtio_ring virtio_console virtio_mmio",
		},
		{
			name: "9p diamond",
			mods: []*Module{mod("9p", "9pnet", "fscache", "netfs"), mod("fscache", "netfs"), mod("netfs"), mod("9pnet")},
			want: "9pnet netfs fscache 9p",
		},
		{
			name: "softdep through an alias",
			mods: []*Module{libcrc, crc},
			want: "crc32c_generic libcrc32c",
		},
		{name: "absent softdep ignored", mods: []*Module{withAbsentSoft}, want: "a"},
		{
			name:    "missing dependency",
			mods:    []*Module{mod("ext4", "jbd2")},
			wantErr: errdefs.IsNotFound, errHas: "jbd2",
		},
		{
			name:    "cycle",
			mods:    []*Module{mod("a", "b"), mod("b", "c"), mod("c", "a")},
			wantErr: errdefs.IsInvalidArgument, errHas: "a -> b -> c -> a",
		},
		{
			name:    "self cycle",
			mods:    []*Module{mod("a", "a")},
			wantErr: errdefs.IsInvalidArgument, errHas: "a -> a",
		},
		{
			name:    "duplicate",
			mods:    []*Module{mod("a"), mod("a")},
			wantErr: errdefs.IsInvalidArgument,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := LoadOrder(tc.mods)
			if tc.wantErr != nil {
				if !tc.wantErr(err) || !strings.Contains(errString(err), tc.errHas) {
					t.Fatalf("got %v, want an error mentioning %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if names(got) != tc.want {
				t.Errorf("got %q, want %q", names(got), tc.want)
			}
		})
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestResolveModules(t *testing.T) {
	tree := t.TempDir()
	k := filepath.Join(tree, "kernel")
	writeFakeModule(t, filepath.Join(k, "fs/9p/9p.ko"), "depends=9pnet,fscache,netfs", "name=9p")
	writeFakeModule(t, filepath.Join(k, "fs/fscache/fscache.ko"), "depends=netfs", "name=fscache")
	writeFakeModule(t, filepath.Join(k, "fs/netfs/netfs.ko"), "depends=", "name=netfs")
	writeFakeModule(t, filepath.Join(k, "net/9p/9pnet.ko"), "depends=", "name=9pnet")
	writeFakeModule(t, filepath.Join(k, "drivers/unused.ko"), "depends=", "name=unused")
	writeFakeModule(t, filepath.Join(k, "drivers/virtio/virtio-mmio.ko"), "depends=", "name=virtio_mmio")
	if err := os.WriteFile(filepath.Join(tree, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	got, err := ResolveModules(tree, []string{"9p", "virtio-mmio", "ext4"})
	if err != nil {
		t.Fatal(err)
	}
	if want := "9pnet netfs fscache 9p virtio_mmio"; names(got) != want {
		t.Errorf("got %q, want %q (dependencies added, built-in ext4 skipped, unused left out)", names(got), want)
	}

	if _, err := ResolveModules(tree, []string{"nosuch"}); !errdefs.IsNotFound(err) {
		t.Errorf("unknown module: got %v, want ErrNotFound", err)
	}
	writeFakeModule(t, filepath.Join(k, "broken.ko"), "depends=gone", "name=broken")
	if _, err := ResolveModules(tree, []string{"broken"}); !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "needed by broken") {
		t.Errorf("missing dependency: got %v, want ErrNotFound naming the dependent", err)
	}
}

func TestCompressedModules(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "src", "virtio.ko")
	writeFakeModule(t, plain, "depends=virtio_ring", "name=virtio")
	orig, err := os.ReadFile(plain)
	if err != nil {
		t.Fatal(err)
	}
	mods := filepath.Join(dir, "mods")
	if err := os.MkdirAll(mods, 0o755); err != nil {
		t.Fatal(err)
	}
	// kmod's style: CRC32, no BCJ.
	if err := os.WriteFile(filepath.Join(mods, "virtio.ko.xz"), xzCompress(t, orig, "--check=crc32", "--lzma2=dict=1MiB"), 0o644); err != nil {
		t.Fatal(err)
	}
	writeFakeModule(t, filepath.Join(mods, "virtio_ring.ko"), "name=virtio_ring")
	if err := os.WriteFile(filepath.Join(mods, "other.ko.zst"), []byte{0x28, 0xb5, 0x2f, 0xfd}, 0o644); err != nil {
		t.Fatal(err)
	}

	got, err := ReadModuleDir(mods)
	if err != nil {
		t.Fatal(err)
	}
	ordered, err := LoadOrder(got)
	if err != nil {
		t.Fatal(err)
	}
	if names(ordered) != "virtio_ring virtio" {
		t.Errorf("got %q, want %q (.ko.zst ignored)", names(ordered), "virtio_ring virtio")
	}
	data, err := ReadModuleFile(filepath.Join(mods, "virtio.ko.xz"))
	if err != nil || !bytes.Equal(data, orig) {
		t.Errorf("ReadModuleFile(.ko.xz): %v, equal=%v", err, bytes.Equal(data, orig))
	}
	if _, err := ReadModuleFile(filepath.Join(mods, "other.ko.zst")); !errdefs.IsNotImplemented(err) {
		t.Errorf(".ko.zst: got %v, want ErrNotImplemented", err)
	}
}

func TestLoadOrderFirst(t *testing.T) {
	mods := []*Module{
		mod("9p", "9pnet", "netfs"), mod("9pnet"), mod("netfs"),
		mod("virtio_console", "virtio", "virtio_ring"), mod("virtio_mmio", "virtio", "virtio_ring"), mod("virtio"), mod("virtio_ring"),
	}
	got, err := LoadOrderFirst(mods, []string{"virtio-mmio", "virtio_console", "absent"})
	if err != nil {
		t.Fatal(err)
	}
	if want := "virtio virtio_ring virtio_mmio virtio_console 9pnet netfs 9p"; names(got) != want {
		t.Errorf("got %q, want %q", names(got), want)
	}
}
