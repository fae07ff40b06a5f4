package bootimage

import (
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"github.com/containerd/errdefs"
)

// ModulesDir is where the initramfs keeps kernel modules, and LoadList
// the file naming them in load order, one absolute path per line. The
// guest agent loads them with finit_module in that order; the guest has
// neither modprobe nor modules.dep.
const (
	ModulesDir = "lib/modules"
	LoadList   = "lib/modules/load.list"
)

// Compression selects how the initramfs is compressed.
type Compression string

const (
	// CompressNone writes a plain cpio: larger, but the kernel unpacks it
	// with memcpy, which matters under TCG where decompression is slow.
	CompressNone Compression = "none"
	// CompressGzip is understood by every kernel configuration.
	CompressGzip Compression = "gzip"
)

// InitrdSpec describes an initramfs for a macvm guest.
type InitrdSpec struct {
	// Init is the host path of the binary that becomes /init (the guest
	// agent, or a test init).
	Init string
	// Modules are packed under /lib/modules and listed in LoadList; they
	// are ordered with LoadOrder, so any order is accepted here.
	Modules []*Module
	// First names modules to load as early as possible (see
	// LoadOrderFirst); DefaultFirstModules when nil.
	First       []string
	Compression Compression
}

// DefaultFirstModules are the modules behind the agent channel under
// QEMU's microvm: with them loaded the agent can talk to the host.
var DefaultFirstModules = []string{"virtio_mmio", "virtio_console"}

// WriteInitrd writes the initramfs described by spec to w. Entries carry
// mtime 0 and root ownership so equal inputs give byte-identical images.
func WriteInitrd(w io.Writer, spec InitrdSpec) error {
	first := spec.First
	if first == nil {
		first = DefaultFirstModules
	}
	order, err := LoadOrderFirst(spec.Modules, first)
	if err != nil {
		return err
	}
	init, err := os.ReadFile(spec.Init)
	if err != nil {
		return fmt.Errorf("reading init: %w", err)
	}

	out := w
	var zw *gzip.Writer
	switch spec.Compression {
	case CompressNone, "":
	case CompressGzip:
		zw = gzip.NewWriter(w)
		out = zw
	default:
		return fmt.Errorf("initramfs compression %q: %w", spec.Compression, errdefs.ErrInvalidArgument)
	}
	cw := NewCPIOWriter(out)

	entries := []CPIOEntry{
		// /dev/console must exist before /init runs: the kernel opens it
		// for init's stdin/stdout/stderr, and without it the agent would
		// start with no fds 0-2 and no console output.
		{Name: "dev", Mode: modeDir | 0o755},
		{Name: "dev/console", Mode: modeCharDev | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "dev/null", Mode: modeCharDev | 0o666, RdevMajor: 1, RdevMinor: 3},
		{Name: "proc", Mode: modeDir | 0o555},
		{Name: "sys", Mode: modeDir | 0o555},
		{Name: "run", Mode: modeDir | 0o755},
		{Name: "tmp", Mode: modeDir | 0o1777},
		{Name: "lib", Mode: modeDir | 0o755},
		{Name: ModulesDir, Mode: modeDir | 0o755},
		{Name: "init", Mode: modeRegular | 0o755, Data: init},
	}
	var list strings.Builder
	for _, m := range order {
		data, err := ReadModuleFile(m.Path)
		if err != nil {
			return fmt.Errorf("reading module %s: %w", m.Name, err)
		}
		name := path.Join(ModulesDir, m.Name+".ko")
		entries = append(entries, CPIOEntry{Name: name, Mode: modeRegular | 0o644, Data: data})
		list.WriteString("/" + name + "\n")
	}
	entries = append(entries, CPIOEntry{Name: LoadList, Mode: modeRegular | 0o644, Data: []byte(list.String())})

	for _, e := range entries {
		if err := cw.WriteEntry(e); err != nil {
			return err
		}
	}
	if err := cw.Close(); err != nil {
		return err
	}
	if zw != nil {
		return zw.Close()
	}
	return nil
}
