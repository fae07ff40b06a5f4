// Command macvm-kernel prepares a distribution kernel for macvm guests:
// it extracts the uncompressed vmlinux from a bzImage (QEMU boots it
// through PVH, about a second faster under TCG than the bzImage) and
// collects the modules the guest agent loads, with their dependencies.
// hack/fetch-kernel.sh drives it after unpacking Debian's kernel package.
// The deb subcommand does all of it from the .deb itself in pure Go, so it
// also runs on a Mac, and produces what Virtualization.framework boots (an
// uncompressed arm64 Image, or an x86_64 bzImage).
//
// Usage:
//
//	macvm-kernel vmlinux -i VMLINUZ -o VMLINUX
//	macvm-kernel modules -tree /lib/modules/VERSION -o DIR NAME...
//	macvm-kernel deb -i linux-image-*.deb -o DIR [-modules a,b,...]
package main

import (
	"flag"
	"fmt"

	"os"
	"path/filepath"

	"github.com/macvm/macvm/pkg/bootimage"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "vmlinux":
		err = extract(os.Args[2:])
	case "modules":
		err = modules(os.Args[2:])
	case "deb":
		err = debCmd(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "macvm-kernel:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: macvm-kernel vmlinux -i VMLINUZ -o VMLINUX\n       macvm-kernel modules -tree /lib/modules/VERSION -o DIR NAME...\n       macvm-kernel deb -i linux-image-*.deb -o DIR [-modules a,b,...]")
	os.Exit(2)
}

func extract(args []string) error {
	fs := flag.NewFlagSet("vmlinux", flag.ExitOnError)
	in := fs.String("i", "", "bzImage (vmlinuz) to read")
	out := fs.String("o", "", "uncompressed ELF kernel to write")
	_ = fs.Parse(args)
	if *in == "" || *out == "" {
		usage()
	}
	img, err := os.ReadFile(*in)
	if err != nil {
		return err
	}
	elf, err := bootimage.ExtractVmlinux(img)
	if err != nil {
		return fmt.Errorf("%s: %w", *in, err)
	}
	return writeAtomic(*out, elf, 0o644)
}

func modules(args []string) error {
	fs := flag.NewFlagSet("modules", flag.ExitOnError)
	tree := fs.String("tree", "", "the kernel's module tree (lib/modules/VERSION)")
	out := fs.String("o", "", "directory to copy the modules into (flat)")
	_ = fs.Parse(args)
	if *tree == "" || *out == "" || fs.NArg() == 0 {
		usage()
	}
	mods, err := bootimage.ResolveModules(*tree, fs.Args())
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	for _, m := range mods {
		if err := copyModule(m.Path, filepath.Join(*out, m.Name+".ko")); err != nil {
			return err
		}
		fmt.Println(m.Name)
	}
	return nil
}

// copyModule writes the module uncompressed: the guest loads it with
// plain finit_module.
func copyModule(src, dst string) error {
	data, err := bootimage.ReadModuleFile(src)
	if err != nil {
		return err
	}
	return writeAtomic(dst, data, 0o644)
}

// writeAtomic writes through a temporary file and a rename so an
// interrupted run never leaves a truncated file that a later cached run
// would take for complete.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
