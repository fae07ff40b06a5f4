package service

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/pelletier/go-toml/v2"
)

// DefaultConfigPath is read when neither containerd's runtime options
// (ConfigPath) nor MACVM_CONFIG name a file. It may be absent.
const DefaultConfigPath = "/etc/macvm/config.toml"

// Annotations a container's spec can carry to size its VM.
const (
	AnnotationCPUs      = "io.macvm.vm.cpus"
	AnnotationMemoryMiB = "io.macvm.vm.memory_mib"
)

// Config is the shim's TOML configuration: which kernel, initramfs and
// hypervisor boot the container VMs and how big they are.
//
//	kernel = "/usr/local/share/macvm/vmlinux"
//	initrd = "/usr/local/share/macvm/initrd.img"
//	hypervisor = "/usr/bin/qemu-system-x86_64"
//	cpus = 0                  # 0: the CPU quota rounded up (at most the host's CPUs), else 1
//	memory_mib = 0            # 0: the OCI memory limit + memory_overhead_mib
//	default_memory_mib = 512  # when the container has no memory limit
//	memory_overhead_mib = 96  # guest kernel + agent, on top of the limit
//	kernel_args = ["loglevel=4"]
//	boot_timeout = "60s"      # from hypervisor start to the agent's answer (a clone: also handshake to first RPC answer)
//	warm_start = "template"   # "template" (default), "pool" (template clones started ahead) or "off"
//	pool_size = 0             # VMs per template the pool daemon keeps ready (pool mode; 0: no pool)
//	pool_idle_timeout = "10m" # the pool daemon drops a pool (and exits) unused this long
//	template_dir = "/var/lib/macvm/templates"
//	state_dir = "/run/macvm"  # VM state dirs (console log, pod share mounts)
type Config struct {
	Kernel            string   `toml:"kernel"`
	Initrd            string   `toml:"initrd"`
	Hypervisor        string   `toml:"hypervisor"`
	CPUs              int      `toml:"cpus"`
	MemoryMiB         int      `toml:"memory_mib"`
	DefaultMemoryMiB  int      `toml:"default_memory_mib"`
	MemoryOverheadMiB int      `toml:"memory_overhead_mib"`
	KernelArgs        []string `toml:"kernel_args"`
	BootTimeout       string   `toml:"boot_timeout"`
	// Warm start (warm.go): how VMs start, and where templates are kept.
	WarmStart       string `toml:"warm_start"`
	PoolSize        int    `toml:"pool_size"`
	PoolIdleTimeout string `toml:"pool_idle_timeout"`
	TemplateDir     string `toml:"template_dir"`
	// StateDir is where each VM's state directory is made (default
	// /run/macvm); the pod share's host mounts live there.
	StateDir string `toml:"state_dir"`

	// source names where the configuration came from, for error messages.
	source string
}

const (
	defaultCPUs              = 1
	defaultMemoryMiB         = 512
	defaultMemoryOverheadMiB = 96
	// minMemoryMiB keeps a tiny OCI limit from producing a VM whose kernel
	// cannot even unpack the initramfs.
	minMemoryMiB       = 128
	defaultBootTimeout = 60 * time.Second
)

// parseConfig decodes a TOML configuration. Unknown keys are errors: a typo
// in a key would otherwise silently boot the wrong kernel or VM size.
func parseConfig(data []byte, source string) (*Config, error) {
	cfg := &Config{source: source}
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var sm *toml.StrictMissingError
		if errors.As(err, &sm) {
			return nil, fmt.Errorf("macvm config %s: %s: %w", source, sm.String(), errdefs.ErrInvalidArgument)
		}
		return nil, fmt.Errorf("macvm config %s: %v: %w", source, err, errdefs.ErrInvalidArgument)
	}
	if cfg.CPUs < 0 || cfg.MemoryMiB < 0 || cfg.DefaultMemoryMiB < 0 || cfg.MemoryOverheadMiB < 0 {
		return nil, fmt.Errorf("macvm config %s: cpus and memory sizes must not be negative: %w", source, errdefs.ErrInvalidArgument)
	}
	switch cfg.WarmStart {
	case "", WarmTemplate, WarmPool, WarmOff:
	default:
		return nil, fmt.Errorf("macvm config %s: warm_start %q: want %q, %q or %q: %w", source, cfg.WarmStart,
			WarmTemplate, WarmPool, WarmOff, errdefs.ErrInvalidArgument)
	}
	if cfg.PoolSize < 0 {
		return nil, fmt.Errorf("macvm config %s: pool_size must not be negative: %w", source, errdefs.ErrInvalidArgument)
	}
	if cfg.PoolIdleTimeout != "" {
		if d, err := time.ParseDuration(cfg.PoolIdleTimeout); err != nil || d < time.Second {
			return nil, fmt.Errorf("macvm config %s: pool_idle_timeout %q is not a duration of at least 1s: %w", source, cfg.PoolIdleTimeout, errdefs.ErrInvalidArgument)
		}
	}
	if cfg.TemplateDir != "" && !filepath.IsAbs(cfg.TemplateDir) {
		return nil, fmt.Errorf("macvm config %s: template_dir %q is not an absolute path: %w", source, cfg.TemplateDir, errdefs.ErrInvalidArgument)
	}
	if cfg.StateDir != "" && !filepath.IsAbs(cfg.StateDir) {
		return nil, fmt.Errorf("macvm config %s: state_dir %q is not an absolute path: %w", source, cfg.StateDir, errdefs.ErrInvalidArgument)
	}
	if cfg.BootTimeout != "" {
		if d, err := time.ParseDuration(cfg.BootTimeout); err != nil || d <= 0 {
			return nil, fmt.Errorf("macvm config %s: boot_timeout %q is not a positive duration: %w", source, cfg.BootTimeout, errdefs.ErrInvalidArgument)
		}
	}
	return cfg, nil
}

// loadConfig reads the configuration: body (containerd's inline
// ConfigBody) wins, then path (the runtime options' ConfigPath or
// MACVM_CONFIG), then DefaultConfigPath. A file named explicitly must exist;
// the default one may be missing, leaving every setting at its default.
func loadConfig(path string, body []byte) (*Config, error) {
	if len(body) > 0 {
		return parseConfig(body, "(runtime options ConfigBody)")
	}
	explicit := path != ""
	if !explicit {
		path = os.Getenv("MACVM_CONFIG")
		explicit = path != ""
	}
	if !explicit {
		path = DefaultConfigPath
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return &Config{source: "(defaults; " + DefaultConfigPath + " is absent)"}, nil
		}
		return nil, fmt.Errorf("read macvm config: %w", err)
	}
	return parseConfig(data, path)
}

// bootDirCandidates lists where boot files are looked for when the config
// names none, relative to the shim binary: an installed layout
// (PREFIX/bin/shim, PREFIX/share/macvm/) and the repository's build output
// (_output/bin/shim, _output/boot/).
func bootDirCandidates(exeDir string) []string {
	var dirs []string
	if d := os.Getenv("MACVM_BOOT_DIR"); d != "" {
		dirs = append(dirs, d)
	}
	return append(dirs,
		filepath.Join(exeDir, "..", "share", "macvm"),
		filepath.Join(exeDir, "..", "boot"),
	)
}

// resolve fills in the defaults and checks that the boot files and the
// hypervisor exist, so that Create fails with an error that names the
// missing path and how to fix it rather than with a hypervisor's exit.
// It leaves an unset cpus at 0: that means "size by the container's CPU
// quota", which vmSize decides per VM.
func (c *Config) resolve(exeDir string, lookupHypervisor func(string) (string, string, error)) error {
	if c.DefaultMemoryMiB == 0 {
		c.DefaultMemoryMiB = defaultMemoryMiB
	}
	if c.MemoryOverheadMiB == 0 {
		c.MemoryOverheadMiB = defaultMemoryOverheadMiB
	}
	candidates := bootDirCandidates(exeDir)
	find := func(setting *string, key, name string) error {
		if *setting != "" {
			if _, err := os.Stat(*setting); err != nil {
				return fmt.Errorf("%s %s (from %s) is missing: build it with `make boot` or fix %q in the config: %w",
					key, *setting, c.source, key, errdefs.ErrNotFound)
			}
			return nil
		}
		for _, d := range candidates {
			p := filepath.Join(d, name)
			if _, err := os.Stat(p); err == nil {
				*setting = filepath.Clean(p)
				return nil
			}
		}
		return fmt.Errorf("no %s: looked for %s in %v; build the boot files with `make boot` (or install them in PREFIX/share/macvm) or set %q in %s: %w",
			key, name, candidates, key, DefaultConfigPath, errdefs.ErrNotFound)
	}
	if err := find(&c.Kernel, "kernel", "vmlinux"); err != nil {
		return err
	}
	if err := find(&c.Initrd, "initrd", "initrd.img"); err != nil {
		return err
	}
	if lookupHypervisor != nil {
		path, fix, err := lookupHypervisor(c.Hypervisor)
		if err != nil {
			return fmt.Errorf("hypervisor: %v: %s, or set \"hypervisor\" in %s: %w", err, fix, DefaultConfigPath, errdefs.ErrNotFound)
		}
		c.Hypervisor = path
	}
	return nil
}

// bootTimeout is how long Create waits for the agent of a new VM.
func (c *Config) bootTimeout() time.Duration {
	if d, err := time.ParseDuration(c.BootTimeout); err == nil && d > 0 {
		return d
	}
	return defaultBootTimeout
}

// vmSize decides the VM's CPUs and memory for spec. Precedence: the
// container's annotations, then the config's fixed sizes, then what the OCI
// resources ask for (memory limit + overhead, CPU quota rounded up), then
// the defaults.
func (c *Config) vmSize(spec *specs.Spec) (cpus, memMiB int, err error) {
	cpus, memMiB = c.CPUs, c.MemoryMiB
	if cpus == 0 {
		cpus = defaultCPUs
	}
	var res *specs.LinuxResources
	if spec != nil && spec.Linux != nil {
		res = spec.Linux.Resources
	}
	if memMiB == 0 {
		memMiB = c.DefaultMemoryMiB
		if memMiB == 0 {
			memMiB = defaultMemoryMiB
		}
		if res != nil && res.Memory != nil && res.Memory.Limit != nil && *res.Memory.Limit > 0 {
			overhead := c.MemoryOverheadMiB
			if overhead == 0 {
				overhead = defaultMemoryOverheadMiB
			}
			limitMiB := int((*res.Memory.Limit + (1<<20 - 1)) >> 20)
			memMiB = max(limitMiB+overhead, minMemoryMiB)
		}
	}
	if c.CPUs == 0 && res != nil && res.CPU != nil && res.CPU.Quota != nil && *res.CPU.Quota > 0 &&
		res.CPU.Period != nil && *res.CPU.Period > 0 {
		q, p := uint64(*res.CPU.Quota), *res.CPU.Period
		cpus = min(max(int((q+p-1)/p), 1), runtime.NumCPU())
	}
	if spec != nil {
		if v, ok := spec.Annotations[AnnotationCPUs]; ok {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return 0, 0, fmt.Errorf("annotation %s=%q: want a positive integer: %w", AnnotationCPUs, v, errdefs.ErrInvalidArgument)
			}
			cpus = n
		}
		if v, ok := spec.Annotations[AnnotationMemoryMiB]; ok {
			n, err := strconv.Atoi(v)
			if err != nil || n < minMemoryMiB {
				return 0, 0, fmt.Errorf("annotation %s=%q: want an integer of at least %d: %w", AnnotationMemoryMiB, v, minMemoryMiB, errdefs.ErrInvalidArgument)
			}
			memMiB = n
		}
	}
	return cpus, memMiB, nil
}
