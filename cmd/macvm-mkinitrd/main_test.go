package main

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/bootimage"
)

func TestBuildWritesImageAtomically(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent")
	if err := os.WriteFile(agent, []byte("agent-binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "boot", "initrd.img")
	for _, c := range []bootimage.Compression{bootimage.CompressGzip, bootimage.CompressNone} {
		// No module directory: a kernel with everything built in.
		if err := build(agent, "", out, nil, c); err != nil {
			t.Fatal(err)
		}
	}
	left, _ := filepath.Glob(filepath.Join(dir, "boot", ".initrd.img.*"))
	if len(left) != 0 {
		t.Errorf("temporary files left behind: %v", left)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := bootimage.NewCPIOReader(f)
	found := false
	for {
		e, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if e.Name == "init" {
			found = string(e.Data) == "agent-binary" && e.FileMode().Perm() == 0o755
		}
	}
	if !found {
		t.Error("the image lacks /init with the agent, mode 0755")
	}

	if err := build(agent, filepath.Join(dir, "no-such-dir"), out, nil, bootimage.CompressNone); !errdefs.IsNotFound(err) {
		t.Errorf("missing module dir: got %v, want ErrNotFound", err)
	}
	if err := build(filepath.Join(dir, "no-agent"), "", out, nil, bootimage.CompressNone); err == nil {
		t.Error("missing agent accepted")
	}
}
