// Command macvm-mkinitrd builds the initramfs a macvm guest boots from:
// the guest agent as /init and the kernel modules it loads under
// /lib/modules, with /lib/modules/load.list in dependency order. It is pure
// Go (no cpio, no depmod), so boot files can be built on any host.
//
// Usage:
//
//	macvm-mkinitrd -agent BIN [-modules DIR] [-first MOD,...] [-compress none|gzip] -o FILE
//	macvm-mkinitrd -list FILE
package main

import (
	"bufio"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/macvm/macvm/pkg/bootimage"
)

func main() {
	agent := flag.String("agent", "", "binary to pack as /init (the guest agent)")
	modules := flag.String("modules", "", "directory of .ko files to pack (flat, as hack/fetch-kernel.sh lays them out)")
	out := flag.String("o", "", "initramfs to write")
	compress := flag.String("compress", string(bootimage.CompressNone), "none or gzip (none boots faster under TCG)")
	list := flag.String("list", "", "print the members of an existing initramfs and exit")
	first := flag.String("first", strings.Join(bootimage.DefaultFirstModules, ","),
		"modules to put first in load.list (with their dependencies): the agent channel's")
	flag.Parse()

	var err error
	switch {
	case *list != "":
		err = listImage(*list)
	case *agent != "" && *out != "":
		err = build(*agent, *modules, *out, strings.Split(*first, ","), bootimage.Compression(*compress))
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "macvm-mkinitrd:", err)
		os.Exit(1)
	}
}

func build(agent, modDir, out string, first []string, c bootimage.Compression) error {
	var mods []*bootimage.Module
	if modDir != "" {
		var err error
		if mods, err = bootimage.ReadModuleDir(modDir); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	// Write beside the target and rename: a VM starting meanwhile sees
	// the old image or the new one, never half of one.
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := bootimage.WriteInitrd(tmp, bootimage.InitrdSpec{Init: agent, Modules: mods, First: first, Compression: c}); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}

func listImage(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	var r io.Reader = br
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return err
		}
		r = zr
	}
	cr := bootimage.NewCPIOReader(r)
	for {
		e, err := cr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		fmt.Printf("%s %9d %s\n", e.FileMode(), len(e.Data), e.Name)
	}
}
