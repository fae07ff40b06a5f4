package bootimage

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

func TestWriteInitrd(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent")
	if err := os.WriteFile(agent, []byte("\x7fELF agent"), 0o700); err != nil {
		t.Fatal(err)
	}
	mods := filepath.Join(dir, "modules")
	writeFakeModule(t, filepath.Join(mods, "virtio_console.ko"), "depends=virtio,virtio_ring", "name=virtio_console")
	writeFakeModule(t, filepath.Join(mods, "virtio_ring.ko"), "depends=", "name=virtio_ring")
	writeFakeModule(t, filepath.Join(mods, "virtio.ko"), "depends=", "name=virtio")
	modules, err := ReadModuleDir(mods)
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range []Compression{CompressNone, CompressGzip} {
		t.Run(string(c), func(t *testing.T) {
			var buf bytes.Buffer
			if err := WriteInitrd(&buf, InitrdSpec{Init: agent, Modules: modules, Compression: c}); err != nil {
				t.Fatal(err)
			}
			var r io.Reader = &buf
			if c == CompressGzip {
				zr, err := gzip.NewReader(&buf)
				if err != nil {
					t.Fatal(err)
				}
				r = zr
			}
			entries := map[string]CPIOEntry{}
			for _, e := range readAll(t, r) {
				entries[e.Name] = e
			}
			init, ok := entries["init"]
			if !ok || init.Mode != modeRegular|0o755 || string(init.Data) != "\x7fELF agent" {
				t.Errorf("init: got %+v (present %v), want the agent with mode 0100755", init.Mode, ok)
			}
			con := entries["dev/console"]
			if con.Mode != modeCharDev|0o600 || con.RdevMajor != 5 || con.RdevMinor != 1 {
				t.Errorf("dev/console: got mode %o rdev %d:%d, want a 5:1 char device", con.Mode, con.RdevMajor, con.RdevMinor)
			}
			want := "/lib/modules/virtio.ko\n/lib/modules/virtio_ring.ko\n/lib/modules/virtio_console.ko\n"
			if got := string(entries[LoadList].Data); got != want {
				t.Errorf("load.list: got %q, want %q", got, want)
			}
			for _, n := range []string{"virtio", "virtio_ring", "virtio_console"} {
				e, ok := entries["lib/modules/"+n+".ko"]
				orig, _ := os.ReadFile(filepath.Join(mods, n+".ko"))
				if !ok || !bytes.Equal(e.Data, orig) {
					t.Errorf("module %s missing or altered", n)
				}
			}
			for _, d := range []string{"dev", "proc", "sys", "lib/modules"} {
				if !entries[d].IsDir() {
					t.Errorf("%s is not a directory in the image", d)
				}
			}
		})
	}

	// Identical inputs give identical images.
	var a, b bytes.Buffer
	spec := InitrdSpec{Init: agent, Modules: modules}
	if err := WriteInitrd(&a, spec); err != nil {
		t.Fatal(err)
	}
	if err := WriteInitrd(&b, spec); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two builds of the same initrd differ")
	}

	if err := WriteInitrd(io.Discard, InitrdSpec{Init: agent, Compression: "lz4"}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("unknown compression: got %v, want ErrInvalidArgument", err)
	}
	broken := []*Module{{Name: "a", Path: agent, Depends: []string{"b"}}}
	if err := WriteInitrd(io.Discard, InitrdSpec{Init: agent, Modules: broken}); !errdefs.IsNotFound(err) {
		t.Errorf("unsatisfiable modules: got %v, want ErrNotFound", err)
	}
}
