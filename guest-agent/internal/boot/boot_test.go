package boot

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParseCmdline(t *testing.T) {
	for _, tc := range []struct {
		cmdline string
		want    Options
		wantErr error
	}{
		{"console=ttyS0 quiet", Options{Channel: Channel{"serial", "agent"}}, nil},
		{"console=ttyS0 macvm.channel=serial:agent panic=-1", Options{Channel: Channel{"serial", "agent"}}, nil},
		{"macvm.channel=serial:ctl macvm.debug=1\n", Options{Channel: Channel{"serial", "ctl"}, Debug: true}, nil},
		{"macvm.channel=serial", Options{}, errdefs.ErrInvalidArgument},
		{"console=hvc0 macvm.channel=vsock:1024", Options{Channel: Channel{"vsock", "1024"}}, nil},
		{"macvm.channel=vsock:agent", Options{}, errdefs.ErrInvalidArgument},
		{"macvm.channel=vsock:0", Options{}, errdefs.ErrInvalidArgument},
		{"macvm.channel=vsock:4294967296", Options{}, errdefs.ErrInvalidArgument},
		{"macvm.channel=tcp:1024", Options{}, errdefs.ErrNotImplemented},
	} {
		got, err := ParseCmdline(tc.cmdline)
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("ParseCmdline(%q) error = %v, want %v", tc.cmdline, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseCmdline(%q) = %+v, %v; want %+v", tc.cmdline, got, err, tc.want)
		}
	}
}

func TestUnmountOrder(t *testing.T) {
	got := unmountOrder([]string{"/", "/proc", "/sys", "/sys/fs/cgroup", "/dev", "/dev/pts", "/run", "/run/macvm/c/a/rootfs"})
	want := []string{"/run/macvm/c/a/rootfs", "/sys/fs/cgroup", "/dev/pts", "/run"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("unmountOrder = %q, want %q", got, want)
	}
}

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/x\134y`: `/x\y`, `/trail\04`: `/trail\04`} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestEnableControllers(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "cgroup.controllers"), []byte("cpu memory pids\n"), 0o644)
	// A plain file keeps only the last write, which is enough to see that
	// the unavailable controllers were skipped and the available ones written.
	if err := EnableControllers(dir, []string{"cpu", "io", "pids"}); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
	if string(b) != "+pids" {
		t.Fatalf("last subtree_control write = %q, want +pids", b)
	}
}

func TestLoadModulesMissingListIsFine(t *testing.T) {
	if err := LoadModules(filepath.Join(t.TempDir(), "load.list"), t.Logf); err != nil {
		t.Fatalf("LoadModules without a list: %v", err)
	}
}

func TestLoadModulesReportsMissingFile(t *testing.T) {
	dir := t.TempDir()
	list := filepath.Join(dir, "load.list")
	os.WriteFile(list, []byte("# comment\n\nkernel/nope.ko\n"), 0o644)
	err := LoadModules(list, t.Logf)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("LoadModules = %v, want a not-exist error for the missing module", err)
	}
}
