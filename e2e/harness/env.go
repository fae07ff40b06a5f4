// Package harness runs a private containerd daemon, as root, for end-to-end tests and benchmarks of the
// macvm shim. Everything the daemon owns (root, state, sockets, shim sockets) lives in one temporary
// directory, so a run never touches the machine's own containerd and can be cleaned up completely.
//
// The harness is runtime-agnostic: the same scenarios run against Debian's runc through
// io.containerd.runc.v2 (the known-good reference) and against io.containerd.macvm.v1. It also tracks
// every process it causes to exist (containerd, shims, hypervisors, container processes) by PID
// through the test process's own process tree, so a test can assert that nothing it started survives.
package harness

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Environment variables that point the harness at the build outputs. `make test-e2e` sets both.
const (
	// EnvBinDir names the directory with containerd, ctr, containerd-shim-runc-v2 and
	// containerd-shim-macvm-v1 (make's _output/bin).
	EnvBinDir = "MACVM_BIN_DIR"
	// EnvBootDir names the directory with the guest's vmlinux and initrd.img (make's _output/boot).
	EnvBootDir = "MACVM_BOOT_DIR"
)

// Paths are the build outputs a harness needs.
type Paths struct {
	// BinDir holds containerd, ctr and the shims; it goes first on containerd's PATH so containerd
	// finds containerd-shim-macvm-v1 there (containerd resolves a runtime's binary through PATH).
	BinDir string
	// BootDir holds vmlinux and initrd.img for the macvm runtime.
	BootDir string
}

// PathsFromEnv reads the build output directories from the environment. It fails rather than guessing:
// a test run that silently picked up some other containerd or kernel would report results for the wrong
// binaries.
func PathsFromEnv() (Paths, error) {
	var p Paths
	for _, v := range []struct {
		name string
		dst  *string
	}{{EnvBinDir, &p.BinDir}, {EnvBootDir, &p.BootDir}} {
		val := os.Getenv(v.name)
		if val == "" {
			return Paths{}, fmt.Errorf("%s is not set: run through `make test-e2e`, or set %s=_output/bin and %s=_output/boot after `make boot shim containerd`",
				v.name, EnvBinDir, EnvBootDir)
		}
		abs, err := resolve(val)
		if err != nil {
			return Paths{}, fmt.Errorf("%s=%q: %w", v.name, val, err)
		}
		*v.dst = abs
	}
	for _, b := range []string{"containerd", "ctr"} {
		if err := isExecutable(filepath.Join(p.BinDir, b)); err != nil {
			return Paths{}, fmt.Errorf("%s: %w (run `make containerd`)", EnvBinDir, err)
		}
	}
	return p, nil
}

// resolve makes a relative path absolute against the module root (the directory holding go.mod), not the
// working directory: go test runs each package in its own directory, while people write paths like
// _output/bin from the repository root.
func resolve(p string) (string, error) {
	if filepath.IsAbs(p) {
		return filepath.Clean(p), nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Join(d, p), nil
		}
		if filepath.Dir(d) == d {
			return filepath.Join(dir, p), nil
		}
	}
}

func isExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", path)
	}
	return nil
}

// Snapshot copies the shims and boot files into dir and returns Paths pointing there (containerd,
// ctr and the CRI tools are linked, not copied). A test run then keeps using the binaries it started with even when
// `make shim` or `make boot` replaces the build outputs half-way through, which happens whenever
// someone rebuilds while a long e2e run is going. The returned function removes dir; should the process
// die first, a guardian removes it (and kills anything still running from it).
func (p Paths) Snapshot(dir string) (Paths, func(), error) {
	g, err := startGuardian(dir)
	if err != nil {
		return Paths{}, nil, err
	}
	release := func() {
		g.release()
		os.RemoveAll(dir)
	}
	s, err := p.snapshot(dir)
	if err != nil {
		release()
		return Paths{}, nil, err
	}
	return s, release, nil
}

func (p Paths) snapshot(dir string) (Paths, error) {
	s := Paths{BinDir: filepath.Join(dir, "bin"), BootDir: filepath.Join(dir, "boot")}
	for _, d := range []string{s.BinDir, s.BootDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return Paths{}, err
		}
	}
	// The CRI tools and the CNI plugin directory are linked too (they may be missing: the tests that
	// need them say so).
	for _, b := range []string{"containerd", "ctr", "crictl", "critest", "registry", "cni"} {
		if err := os.Symlink(filepath.Join(p.BinDir, b), filepath.Join(s.BinDir, b)); err != nil {
			return Paths{}, err
		}
	}
	copies := []struct{ src, dst string }{
		{filepath.Join(p.BinDir, "containerd-shim-runc-v2"), filepath.Join(s.BinDir, "containerd-shim-runc-v2")},
		{filepath.Join(p.BinDir, "containerd-shim-macvm-v1"), filepath.Join(s.BinDir, "containerd-shim-macvm-v1")},
		// The shim starts macvm-usernet from its own directory.
		{filepath.Join(p.BinDir, "macvm-usernet"), filepath.Join(s.BinDir, "macvm-usernet")},
		{filepath.Join(p.BootDir, "vmlinux"), filepath.Join(s.BootDir, "vmlinux")},
		{filepath.Join(p.BootDir, "initrd.img"), filepath.Join(s.BootDir, "initrd.img")},
	}
	for _, c := range copies {
		if err := copyFile(c.src, c.dst); err != nil {
			if os.IsNotExist(err) {
				// A missing shim or boot file is reported by the test that needs it, naming the original.
				continue
			}
			return Paths{}, err
		}
	}
	return s, nil
}

// copyFile copies src (following symlinks) to dst with src's permissions.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, fi.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
