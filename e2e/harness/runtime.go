package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Runtime is a containerd runtime the scenarios run against.
type Runtime struct {
	// Short is the name used in test names and MACVM_E2E_RUNTIMES ("runc", "macvm").
	Short string
	// Name is containerd's runtime name (ctr run --runtime).
	Name string
	// Shim is the shim binary containerd resolves Name to; it must be in the bin dir or on PATH.
	Shim string
	// VM is true when containers run in their own guest kernel.
	VM bool
	// CgroupV2 is true when the runtime reports io.containerd.cgroups.v2.Metrics (the VM always mounts
	// cgroup v2 in the guest; runc reports what the host has).
	CgroupV2 bool
}

const (
	// RuncName is containerd's built-in runtime, backed by Debian's runc: the known-good reference.
	RuncName = "io.containerd.runc.v2"
	// MacvmName is this project's runtime.
	MacvmName = "io.containerd.macvm.v1"
)

// Runc is the reference runtime.
func Runc() Runtime {
	return Runtime{Short: "runc", Name: RuncName, Shim: "containerd-shim-runc-v2", CgroupV2: hostCgroupV2()}
}

// Macvm is the runtime under test.
func Macvm() Runtime {
	return Runtime{Short: "macvm", Name: MacvmName, Shim: "containerd-shim-macvm-v1", VM: true, CgroupV2: true}
}

// RuntimeByShort returns the runtime named short ("runc" or "macvm").
func RuntimeByShort(short string) (Runtime, error) {
	switch short {
	case "runc":
		return Runc(), nil
	case "macvm":
		return Macvm(), nil
	}
	return Runtime{}, fmt.Errorf("unknown runtime %q (want runc or macvm)", short)
}

// EnvRuntimes selects the runtimes the e2e scenarios run against, comma-separated (default "runc,macvm").
const EnvRuntimes = "MACVM_E2E_RUNTIMES"

// RuntimesFromEnv returns the runtimes selected by MACVM_E2E_RUNTIMES.
func RuntimesFromEnv() ([]Runtime, error) {
	v := os.Getenv(EnvRuntimes)
	if v == "" {
		v = "runc,macvm"
	}
	var out []Runtime
	for _, s := range strings.Split(v, ",") {
		rt, err := RuntimeByShort(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", EnvRuntimes, err)
		}
		out = append(out, rt)
	}
	return out, nil
}

// hostCgroupV2 reports whether the host mounts the unified cgroup v2 hierarchy at /sys/fs/cgroup.
func hostCgroupV2() bool {
	var st unix.Statfs_t
	return unix.Statfs("/sys/fs/cgroup", &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC
}

// EnvShimConfig is the environment variable through which the macvm shim finds its config file when
// containerd passes no runtime options (ctr without --runtime-config-path). The harness sets it for every
// shim through the shim manager's env list, and also passes the path as runtime options.
const EnvShimConfig = "MACVM_CONFIG"

// WriteMacvmConfig writes the shim's config file naming the boot files, the same format that
// hack/install.sh installs as /etc/macvm/config.toml.
//
// Warm start is off: every VM boots cold, so results do not depend on which test happened to build a
// template, and no detached template builder outlives a test. WriteMacvmConfigWarm turns it on.
func WriteMacvmConfig(path string, p Paths) error {
	return WriteMacvmConfigWarm(path, p, "off", "")
}

// WriteMacvmConfigWarm is WriteMacvmConfig with the shim's warm_start mode ("template", "pool", "off")
// and the directory its templates go to (private to the caller, so nothing leaks between runs).
func WriteMacvmConfigWarm(path string, p Paths, warmStart, templateDir string) error {
	return WriteMacvmConfigExtra(path, p, warmStart, templateDir, "")
}

// WriteMacvmConfigExtra is WriteMacvmConfigWarm with extra TOML lines
// appended (e.g. pool_size and pool_idle_timeout for warm_start "pool").
func WriteMacvmConfigExtra(path string, p Paths, warmStart, templateDir, extra string) error {
	kernel := filepath.Join(p.BootDir, "vmlinux")
	initrd := filepath.Join(p.BootDir, "initrd.img")
	// The VMs' state (and the shim's host mounts) below the harness's
	// directory, where the leftover check looks.
	cfg := fmt.Sprintf(`# macvm shim configuration, written by the e2e harness.
kernel = %q
initrd = %q
state_dir = %q
warm_start = %q
`, kernel, initrd, filepath.Join(filepath.Dir(path), "vm"), warmStart)
	if templateDir != "" {
		cfg += fmt.Sprintf("template_dir = %q\n", templateDir)
	}
	if extra != "" {
		cfg += strings.TrimSpace(extra) + "\n"
	}
	return os.WriteFile(path, []byte(cfg), 0o644)
}
