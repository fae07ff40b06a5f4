package service

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestParseConfig(t *testing.T) {
	cfg, err := parseConfig([]byte(`
kernel = "/k/vmlinux"
initrd = "/k/initrd.img"
hypervisor = "/usr/bin/qemu-system-x86_64"
cpus = 2
memory_mib = 1024
kernel_args = ["loglevel=4"]
boot_timeout = "30s"
`), "test.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Kernel != "/k/vmlinux" || cfg.Initrd != "/k/initrd.img" || cfg.CPUs != 2 || cfg.MemoryMiB != 1024 ||
		len(cfg.KernelArgs) != 1 || cfg.bootTimeout().String() != "30s" || cfg.Hypervisor != "/usr/bin/qemu-system-x86_64" {
		t.Errorf("parsed %+v", cfg)
	}

	for name, bad := range map[string]string{
		"unknown key":  `kernal = "/k"`,
		"wrong type":   `cpus = "two"`,
		"negative":     `memory_mib = -1`,
		"bad duration": `boot_timeout = "soon"`,
		"not toml":     `kernel = `,
	} {
		_, err := parseConfig([]byte(bad), "bad.toml")
		if !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: got %v, want ErrInvalidArgument", name, err)
		}
		if err != nil && !strings.Contains(err.Error(), "bad.toml") {
			t.Errorf("%s: error %q does not name the file", name, err)
		}
	}
}

func TestLoadConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(path, []byte(`cpus = 3`), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("MACVM_CONFIG", "")
	cfg, err := loadConfig(path, nil)
	if err != nil || cfg.CPUs != 3 {
		t.Fatalf("explicit path: got %+v, %v", cfg, err)
	}
	cfg, err = loadConfig(path, []byte(`cpus = 4`))
	if err != nil || cfg.CPUs != 4 {
		t.Fatalf("body wins over path: got %+v, %v", cfg, err)
	}
	t.Setenv("MACVM_CONFIG", path)
	cfg, err = loadConfig("", nil)
	if err != nil || cfg.CPUs != 3 {
		t.Fatalf("MACVM_CONFIG: got %+v, %v", cfg, err)
	}
	if _, err := loadConfig(filepath.Join(dir, "missing.toml"), nil); err == nil {
		t.Fatal("an explicitly named missing config must be an error")
	}
}

func TestResolveNamesMissingFiles(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("MACVM_BOOT_DIR", "")
	exeDir := filepath.Join(dir, "bin")
	cfg := &Config{source: "test"}
	err := cfg.resolve(exeDir, nil)
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "vmlinux") || !strings.Contains(err.Error(), "make boot") {
		t.Fatalf("missing kernel: got %v", err)
	}

	boot := filepath.Join(dir, "boot")
	os.MkdirAll(boot, 0o755)
	os.WriteFile(filepath.Join(boot, "vmlinux"), nil, 0o644)
	os.WriteFile(filepath.Join(boot, "initrd.img"), nil, 0o644)
	cfg = &Config{source: "test"}
	if err := cfg.resolve(exeDir, nil); err != nil {
		t.Fatal(err)
	}
	if cfg.Kernel != filepath.Join(boot, "vmlinux") || cfg.Initrd != filepath.Join(boot, "initrd.img") {
		t.Errorf("defaults next to the binary: got %s %s", cfg.Kernel, cfg.Initrd)
	}

	cfg = &Config{source: "test"}
	err = cfg.resolve(exeDir, func(string) (string, string, error) {
		return "", "install it (apt-get install qemu-system-x86)", os.ErrNotExist
	})
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "apt-get install qemu-system-x86") {
		t.Errorf("missing hypervisor: got %v", err)
	}

	cfg = &Config{Kernel: filepath.Join(dir, "nope"), source: "x.toml"}
	err = cfg.resolve(exeDir, nil)
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), filepath.Join(dir, "nope")) {
		t.Errorf("configured kernel missing: got %v", err)
	}
}

func TestVMSize(t *testing.T) {
	i64 := func(v int64) *int64 { return &v }
	u64 := func(v uint64) *uint64 { return &v }
	withLimit := func(limit int64) *specs.Spec {
		return &specs.Spec{Linux: &specs.Linux{Resources: &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: i64(limit)}}}}
	}
	for _, tc := range []struct {
		name     string
		cfg      Config
		spec     *specs.Spec
		cpus     int
		mem      int
		wantFail bool
	}{
		{name: "defaults", spec: &specs.Spec{}, cpus: 1, mem: defaultMemoryMiB},
		{name: "limit plus overhead", spec: withLimit(256 << 20), cpus: 1, mem: 256 + defaultMemoryOverheadMiB},
		{name: "tiny limit is raised", spec: withLimit(1 << 20), cpus: 1, mem: minMemoryMiB},
		{name: "config fixes memory", cfg: Config{MemoryMiB: 700}, spec: withLimit(256 << 20), cpus: 1, mem: 700},
		{name: "config overhead", cfg: Config{MemoryOverheadMiB: 10}, spec: withLimit(300 << 20), cpus: 1, mem: 310},
		{name: "cpu quota", spec: &specs.Spec{Linux: &specs.Linux{Resources: &specs.LinuxResources{
			CPU: &specs.LinuxCPU{Quota: i64(150000), Period: u64(100000)}}}}, cpus: min(2, runtime.NumCPU()), mem: defaultMemoryMiB},
		{name: "annotations win", cfg: Config{CPUs: 1, MemoryMiB: 300},
			spec: &specs.Spec{Annotations: map[string]string{AnnotationCPUs: "2", AnnotationMemoryMiB: "900"}}, cpus: 2, mem: 900},
		{name: "bad cpus annotation", spec: &specs.Spec{Annotations: map[string]string{AnnotationCPUs: "0"}}, wantFail: true},
		{name: "bad memory annotation", spec: &specs.Spec{Annotations: map[string]string{AnnotationMemoryMiB: "lots"}}, wantFail: true},
	} {
		cpus, mem, err := tc.cfg.vmSize(tc.spec)
		if tc.wantFail {
			if !errdefs.IsInvalidArgument(err) {
				t.Errorf("%s: got %v, want ErrInvalidArgument", tc.name, err)
			}
			continue
		}
		if err != nil || cpus != tc.cpus || mem != tc.mem {
			t.Errorf("%s: got (%d, %d, %v), want (%d, %d)", tc.name, cpus, mem, err, tc.cpus, tc.mem)
		}
	}
}

// TestVMSizeAfterResolve: the shim sizes VMs with a resolved config, and
// resolving must not turn an unset cpus into a fixed one (it did: every
// CPU quota, a container's or a pod's, then gave one vCPU).
func TestVMSizeAfterResolve(t *testing.T) {
	boot := t.TempDir()
	t.Setenv("MACVM_BOOT_DIR", boot)
	os.WriteFile(filepath.Join(boot, "vmlinux"), nil, 0o644)
	os.WriteFile(filepath.Join(boot, "initrd.img"), nil, 0o644)
	quota, period := int64(150000), uint64(100000)
	spec := &specs.Spec{Linux: &specs.Linux{Resources: &specs.LinuxResources{
		CPU: &specs.LinuxCPU{Quota: &quota, Period: &period}}}}
	for body, want := range map[string]int{
		``:         min(2, runtime.NumCPU()),
		`cpus = 1`: 1,
	} {
		cfg, err := parseConfig([]byte(body), "t.toml")
		if err != nil {
			t.Fatal(err)
		}
		if err := cfg.resolve(t.TempDir(), nil); err != nil {
			t.Fatal(err)
		}
		if cpus, _, err := cfg.vmSize(spec); err != nil || cpus != want {
			t.Errorf("config %q, quota 1.5 CPUs: got %d vCPUs (%v), want %d", body, cpus, err, want)
		}
		if cpus, _, err := cfg.vmSize(&specs.Spec{}); err != nil || cpus != 1 {
			t.Errorf("config %q, no quota: got %d vCPUs (%v), want 1", body, cpus, err)
		}
	}
}

func TestWarmStartConfig(t *testing.T) {
	for body, want := range map[string]string{
		``:                                     WarmTemplate,
		`warm_start = "template"`:              WarmTemplate,
		`warm_start = "off"`:                   WarmOff,
		`warm_start = "pool"`:                  WarmPool,
		"warm_start = \"pool\"\npool_size = 2": WarmPool,
	} {
		cfg, err := parseConfig([]byte(body), "t.toml")
		if err != nil {
			t.Fatalf("%q: %v", body, err)
		}
		if got := cfg.warmStart(); got != want {
			t.Errorf("%q: warm start %q, want %q", body, got, want)
		}
		if (cfg.templates(t.Context()) == nil) != (want == WarmOff) {
			t.Errorf("%q: template cache %v", body, cfg.templates(t.Context()))
		}
	}
	pool, err := parseConfig([]byte("warm_start = \"pool\"\npool_size = 2\npool_idle_timeout = \"90s\"\ntemplate_dir = \"/x/t\""), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	if pc := pool.templates(t.Context()).Pool; pc == nil || pc.Size != 2 || pc.IdleTimeout != 90*time.Second || pc.Dir != "/x/t/pool" {
		t.Errorf("pool client %+v", pc)
	}
	if tc := (&Config{}).templates(t.Context()); tc.Pool != nil {
		t.Errorf("template mode has a pool client")
	}
	for _, bad := range []string{`pool_idle_timeout = "soon"`, `pool_idle_timeout = "10ms"`, `pool_size = -1`} {
		if _, err := parseConfig([]byte(bad), "t.toml"); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: got %v, want ErrInvalidArgument", bad, err)
		}
	}
	cfg, _ := parseConfig([]byte(`template_dir = "/x/t"`), "t.toml")
	if cfg.templateDir() != "/x/t" {
		t.Errorf("template_dir %q", cfg.templateDir())
	}
	if cfg, _ := parseConfig(nil, "t.toml"); cfg.templateDir() != DefaultTemplateDir {
		t.Errorf("default template dir %q", cfg.templateDir())
	}
	for _, bad := range []string{`warm_start = "on"`, `pool_size = -1`, `template_dir = "rel/dir"`} {
		if _, err := parseConfig([]byte(bad), "bad.toml"); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%q: %v, want invalid argument", bad, err)
		}
	}
}
