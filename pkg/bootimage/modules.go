package bootimage

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/errdefs"
)

// Module is a kernel module file and what its .modinfo section says about
// it. The guest has no modprobe and no modules.dep, so the dependency order
// is decided here, on the host, from the same metadata depmod would read.
type Module struct {
	// Name is the kernel's name for the module (underscores, no suffix),
	// which is what other modules' depends= lists refer to.
	Name string
	// Path is the .ko file on the host.
	Path string
	// Depends lists the modules that must be loaded first.
	Depends []string
	// SoftPre lists the "softdep pre:" names: modules (or aliases) that
	// should be loaded first if available. libcrc32c, for one, fails to
	// initialise unless a crc32c implementation is already loaded, and
	// nothing in the guest would load it on demand.
	SoftPre []string
	// Aliases are the other names the module answers to (crc32c_generic
	// is "crc32c"), used to resolve other modules' SoftPre.
	Aliases []string
}

// ReadModuleFile returns a module's ELF object: .ko files as they are,
// .ko.xz files (how Debian 13 and later ship modules) decompressed, since
// the guest loads modules with plain finit_module.
func ReadModuleFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	switch {
	case strings.HasSuffix(path, ".ko"):
		return data, nil
	case strings.HasSuffix(path, ".ko.xz"):
		out, err := DecompressXZ(data)
		if err != nil {
			return nil, fmt.Errorf("module %s: %w", path, err)
		}
		return out, nil
	}
	return nil, fmt.Errorf("module %s: compression not supported (only .ko and .ko.xz): %w", path, ErrUnsupported)
}

// ReadModule parses the .modinfo section of a .ko or .ko.xz file.
func ReadModule(path string) (*Module, error) {
	data, err := ReadModuleFile(path)
	if err != nil {
		return nil, err
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w: %w", path, ErrCorrupt, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("module %s has no .modinfo section: %w", path, ErrCorrupt)
	}
	info, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("module %s: .modinfo: %w: %w", path, ErrCorrupt, err)
	}
	m := &Module{Path: path, Name: ModuleNameFromPath(path)}
	for _, kv := range bytes.Split(info, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			m.Name = v
		case "alias":
			m.Aliases = append(m.Aliases, NormalizeModuleName(v))
		case "softdep":
			// "pre: a b post: c d"
			pre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						m.SoftPre = append(m.SoftPre, NormalizeModuleName(w))
					}
				}
			}
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					m.Depends = append(m.Depends, NormalizeModuleName(d))
				}
			}
		}
	}
	sort.Strings(m.Depends)
	return m, nil
}

// NormalizeModuleName maps a module name as users and file names write it
// (dashes allowed) to the kernel's form (underscores), as kmod does.
func NormalizeModuleName(name string) string {
	return strings.ReplaceAll(name, "-", "_")
}

// ModuleNameFromPath derives a module's name from its file name; the
// kernel build names files after their module, modulo dashes.
func ModuleNameFromPath(path string) string {
	base := filepath.Base(path)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return NormalizeModuleName(base)
}

// ReadModuleDir reads every .ko and .ko.xz file directly under dir.
// A missing directory is an errdefs.ErrNotFound error rather than an
// empty set: an initramfs silently built without the channel's modules
// would boot a guest that never answers.
func ReadModuleDir(dir string) ([]*Module, error) {
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("module directory %s: %w", dir, errdefs.ErrNotFound)
	}
	matches, err := filepath.Glob(filepath.Join(dir, "*.ko"))
	if err != nil {
		return nil, err
	}
	xz, err := filepath.Glob(filepath.Join(dir, "*.ko.xz"))
	if err != nil {
		return nil, err
	}
	matches = append(matches, xz...)
	mods := make([]*Module, 0, len(matches))
	for _, p := range matches {
		m, err := ReadModule(p)
		if err != nil {
			return nil, err
		}
		mods = append(mods, m)
	}
	return mods, nil
}

// LoadOrder sorts modules so that every module comes after the modules it
// depends on, and after its soft pre-dependencies that are in the set
// (matched by name or alias; absent ones are ignored, as modprobe does). The order is deterministic (ties broken by name) so initrd
// images are reproducible. A dependency outside the set is an
// errdefs.ErrNotFound error, a dependency cycle (which the kernel could
// never satisfy) an errdefs.ErrInvalidArgument one.
func LoadOrder(mods []*Module) ([]*Module, error) { return LoadOrderFirst(mods, nil) }

// LoadOrderFirst is LoadOrder with the named modules (and what they need)
// placed as early as the dependencies allow, in the order given. The
// initramfs puts the agent channel's modules first so the agent can open
// its channel before it loads the rest (under TCG each module costs tens
// of milliseconds). Names not in the set are ignored.
func LoadOrderFirst(mods []*Module, first []string) ([]*Module, error) {
	byName := make(map[string]*Module, len(mods))
	names := make([]string, 0, len(mods))
	for _, m := range mods {
		if prev, ok := byName[m.Name]; ok {
			return nil, fmt.Errorf("module %s given twice (%s, %s): %w", m.Name, prev.Path, m.Path, errdefs.ErrInvalidArgument)
		}
		byName[m.Name] = m
		names = append(names, m.Name)
	}
	sort.Strings(names)
	byAlias := make(map[string]string)
	for _, m := range mods {
		for _, a := range m.Aliases {
			if _, ok := byAlias[a]; !ok {
				byAlias[a] = m.Name
			}
		}
	}
	// before lists, per module, the hard then the soft edges.
	before := make(map[string][]string, len(mods))
	for _, m := range mods {
		edges := append([]string{}, m.Depends...)
		for _, s := range m.SoftPre {
			if _, ok := byName[s]; ok {
				edges = append(edges, s)
			} else if n, ok := byAlias[s]; ok && n != m.Name {
				edges = append(edges, n)
			}
		}
		before[m.Name] = edges
	}

	const (
		unvisited = iota
		visiting
		done
	)
	state := make(map[string]int, len(mods))
	order := make([]*Module, 0, len(mods))
	var stack []string
	var visit func(name string) error
	visit = func(name string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			i := len(stack) - 1
			for i > 0 && stack[i] != name {
				i--
			}
			cycle := append(append([]string{}, stack[i:]...), name)
			return fmt.Errorf("module dependency cycle %s: %w", strings.Join(cycle, " -> "), errdefs.ErrInvalidArgument)
		}
		m := byName[name]
		state[name] = visiting
		stack = append(stack, name)
		for _, d := range before[name] {
			if _, ok := byName[d]; !ok {
				return fmt.Errorf("module %s depends on %s, which is not in the set: %w", name, d, errdefs.ErrNotFound)
			}
			if err := visit(d); err != nil {
				return err
			}
		}
		stack = stack[:len(stack)-1]
		state[name] = done
		order = append(order, m)
		return nil
	}
	for _, n := range first {
		if _, ok := byName[NormalizeModuleName(n)]; !ok {
			continue
		}
		if err := visit(NormalizeModuleName(n)); err != nil {
			return nil, err
		}
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// ResolveModules finds the named modules under a kernel's module tree
// (e.g. /lib/modules/VERSION) and adds everything they depend on,
// transitively. Names the kernel has built in (no .ko in the tree, listed
// in modules.builtin when the tree has one) are skipped, so the same list
// works for kernels that differ in what is modular.
func ResolveModules(tree string, names []string) ([]*Module, error) {
	index := map[string]string{}
	err := filepath.WalkDir(tree, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".ko") || strings.HasSuffix(p, ".ko.xz")) {
			index[ModuleNameFromPath(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("indexing modules under %s: %w", tree, err)
	}
	builtin := map[string]bool{}
	if data, err := os.ReadFile(filepath.Join(tree, "modules.builtin")); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if l != "" {
				builtin[ModuleNameFromPath(l)] = true
			}
		}
	}

	seen := map[string]*Module{}
	var out []*Module
	var add func(name, from string) error
	add = func(name, from string) error {
		name = NormalizeModuleName(name)
		if _, ok := seen[name]; ok {
			return nil
		}
		p, ok := index[name]
		if !ok {
			if builtin[name] {
				return nil
			}
			if from != "" {
				return fmt.Errorf("module %s (needed by %s) not found under %s: %w", name, from, tree, errdefs.ErrNotFound)
			}
			return fmt.Errorf("module %s not found under %s: %w", name, tree, errdefs.ErrNotFound)
		}
		m, err := ReadModule(p)
		if err != nil {
			return err
		}
		seen[name] = m
		out = append(out, m)
		for _, d := range m.Depends {
			if err := add(d, name); err != nil {
				return err
			}
		}
		return nil
	}
	for _, n := range names {
		if err := add(n, ""); err != nil {
			return nil, err
		}
	}
	return LoadOrder(out)
}
