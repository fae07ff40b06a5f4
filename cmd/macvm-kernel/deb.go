package main

import (
	"archive/tar"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/macvm/macvm/pkg/bootimage"
)

// vzModules are what a Virtualization.framework guest needs from a
// distribution kernel that has them as modules (Debian's cloud kernels):
// the PCI transport its virtio devices sit on, the console (hvc0), the
// vsock agent channel, virtiofs shares, disks, the NIC, the entropy device,
// the filesystems of a container root, and bridge for containers that make
// their own bridges (as on QEMU). Built-in names are skipped.
var vzModules = []string{
	"virtio_pci", "virtio_console", "vmw_vsock_virtio_transport", "virtiofs",
	"virtio_blk", "virtio_net", "virtio_rng", "overlay", "erofs", "ext4", "crc32c_generic", "bridge",
}

// vzFirstModules are loaded before the rest so the agent can reach the
// host early: the PCI transport and the vsock channel (macvm-mkinitrd -first).
var vzFirstModules = []string{"virtio_pci", "vmw_vsock_virtio_transport"}

// debCmd turns a Debian kernel package into boot files, without dpkg or
// any other Linux tool, so that it runs on a Mac:
//
//	DIR/Image      arm64: the uncompressed Image Virtualization.framework boots
//	DIR/bzImage    amd64: the bzImage as shipped (Virtualization.framework on Intel)
//	DIR/vmlinux    amd64: the uncompressed ELF inside it (QEMU's PVH boot), when
//	               its compression is one ExtractVmlinux decodes
//	DIR/modules/   the modules (flat, uncompressed) and what they depend on
//	DIR/modules.list, DIR/config, DIR/version
//
// DIR is replaced as a whole, so an interrupted run leaves no half-made
// directory behind.
func debCmd(args []string) error {
	fs := flag.NewFlagSet("deb", flag.ExitOnError)
	in := fs.String("i", "", "Debian kernel package (linux-image-*.deb)")
	out := fs.String("o", "", "directory to write the boot files into")
	mods := fs.String("modules", strings.Join(vzModules, ","), "comma-separated modules to collect (with dependencies; built-in ones are skipped)")
	_ = fs.Parse(args)
	if *in == "" || *out == "" {
		usage()
	}
	var names []string
	for _, n := range strings.Split(*mods, ",") {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, n)
		}
	}
	res, err := unpackKernelDeb(*in, *out, names)
	if err != nil {
		return fmt.Errorf("%s: %w", *in, err)
	}
	if res.warning != "" {
		fmt.Fprintln(os.Stderr, "macvm-kernel: warning:", res.warning)
	}
	fmt.Printf("%s %s (%s): %s, %d modules -> %s\n", res.pkg, res.version, res.arch, res.kernelFile, res.modules, *out)
	return nil
}

type debResult struct {
	pkg, version, arch string
	kernelFile         string
	modules            int
	// warning is something the caller should print: the result is usable.
	warning string
}

func unpackKernelDeb(debPath, out string, modNames []string) (debResult, error) {
	f, err := os.Open(debPath)
	if err != nil {
		return debResult{}, err
	}
	defer f.Close()
	control, err := bootimage.DebControl(f)
	if err != nil {
		return debResult{}, err
	}
	res := debResult{pkg: control["Package"], version: control["Version"], arch: control["Architecture"]}
	if res.arch != "arm64" && res.arch != "amd64" {
		return res, fmt.Errorf("package architecture %q: only arm64 and amd64: %w", res.arch, errdefs.ErrNotImplemented)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return res, err
	}

	// Build next to out and swap it in at the end.
	if err := os.MkdirAll(filepath.Dir(filepath.Clean(out)), 0o755); err != nil {
		return res, err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(filepath.Clean(out)), "."+filepath.Base(out)+".new.")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(tmp)
	tree := filepath.Join(tmp, "tree")

	var vmlinuz, config []byte
	var kver string
	err = bootimage.WalkDeb(f, func(hdr *tar.Header, r io.Reader) error {
		name := path.Clean("/" + hdr.Name) // "./boot/x" -> "/boot/x"; no escaping the tree
		switch {
		case hdr.Typeflag != tar.TypeReg:
			return nil
		case strings.HasPrefix(name, "/boot/vmlinuz-"), strings.HasPrefix(name, "/boot/vmlinux-"):
			kver = strings.TrimPrefix(strings.TrimPrefix(name, "/boot/vmlinuz-"), "/boot/vmlinux-")
			vmlinuz, err = io.ReadAll(r)
			return err
		case strings.HasPrefix(name, "/boot/config-"):
			config, err = io.ReadAll(r)
			return err
		case strings.HasPrefix(name, "/lib/modules/"), strings.HasPrefix(name, "/usr/lib/modules/"):
			rel := strings.TrimPrefix(strings.TrimPrefix(name, "/usr"), "/lib/modules/")
			base := path.Base(rel)
			if !strings.HasSuffix(base, ".ko") && !strings.HasSuffix(base, ".ko.xz") && !strings.HasPrefix(base, "modules.builtin") {
				return nil
			}
			dst := filepath.Join(tree, filepath.FromSlash(rel))
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			w, err := os.Create(dst)
			if err != nil {
				return err
			}
			if _, err := io.Copy(w, r); err != nil {
				w.Close()
				return err
			}
			return w.Close()
		}
		return nil
	})
	if err != nil {
		return res, err
	}
	if vmlinuz == nil {
		return res, fmt.Errorf("no /boot/vmlinuz-* in the package: %w", errdefs.ErrNotFound)
	}

	dir := filepath.Join(tmp, "out")
	if err := os.MkdirAll(filepath.Join(dir, "modules"), 0o755); err != nil {
		return res, err
	}
	switch res.arch {
	case "arm64":
		img, err := bootimage.ARM64Image(vmlinuz)
		if err != nil {
			return res, err
		}
		res.kernelFile = "Image"
		if err := writeAtomic(filepath.Join(dir, "Image"), img, 0o644); err != nil {
			return res, err
		}
	case "amd64":
		if !bootimage.IsBzImage(vmlinuz) {
			return res, fmt.Errorf("vmlinuz-%s is not a bzImage: %w", kver, errdefs.ErrInvalidArgument)
		}
		res.kernelFile = "bzImage"
		if err := writeAtomic(filepath.Join(dir, "bzImage"), vmlinuz, 0o644); err != nil {
			return res, err
		}
		// The ELF is only for QEMU; Virtualization.framework boots the
		// bzImage, so a payload compression we cannot undo (Debian's cloud
		// kernel uses lz4) costs the QEMU path only.
		elf, err := bootimage.ExtractVmlinux(vmlinuz)
		if err != nil {
			res.warning = fmt.Sprintf("no vmlinux for QEMU: %v", err)
		} else if err := writeAtomic(filepath.Join(dir, "vmlinux"), elf, 0o644); err != nil {
			return res, err
		}
	}
	if config != nil {
		if err := writeAtomic(filepath.Join(dir, "config"), config, 0o644); err != nil {
			return res, err
		}
	}

	modTree := filepath.Join(tree, kver)
	var list []string
	if len(modNames) > 0 {
		mods, err := bootimage.ResolveModules(modTree, modNames)
		if err != nil {
			return res, err
		}
		for _, m := range mods {
			if err := copyModule(m.Path, filepath.Join(dir, "modules", m.Name+".ko")); err != nil {
				return res, err
			}
			list = append(list, m.Name)
		}
	}
	res.modules = len(list)
	if err := writeAtomic(filepath.Join(dir, "modules.list"), []byte(strings.Join(list, "\n")+"\n"), 0o644); err != nil {
		return res, err
	}
	if err := writeAtomic(filepath.Join(dir, "version"), []byte(res.pkg+" "+res.version+"\n"), 0o644); err != nil {
		return res, err
	}
	if err := os.RemoveAll(out); err != nil {
		return res, err
	}
	return res, os.Rename(dir, out)
}
