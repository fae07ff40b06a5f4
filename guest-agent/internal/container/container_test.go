package container

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func TestParseMountOptions(t *testing.T) {
	for _, tc := range []struct {
		opts []string
		want mountOptions
	}{
		{[]string{"trans=virtio", "version=9p2000.L", "msize=512000"}, mountOptions{data: "trans=virtio,version=9p2000.L,msize=512000"}},
		{[]string{"nosuid", "noexec", "nodev", "ro"}, mountOptions{flags: unix.MS_NOSUID | unix.MS_NOEXEC | unix.MS_NODEV | unix.MS_RDONLY}},
		{[]string{"ro", "rw"}, mountOptions{}},
		{[]string{"rbind", "rprivate", "ro"}, mountOptions{flags: unix.MS_RDONLY, propagation: unix.MS_PRIVATE | unix.MS_REC, bind: true, rec: true}},
		{[]string{"nosuid", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}, mountOptions{flags: unix.MS_NOSUID, data: "newinstance,ptmxmode=0666,mode=0620,gid=5"}},
		{[]string{"bind"}, mountOptions{bind: true}},
	} {
		if got := parseMountOptions(tc.opts); got != tc.want {
			t.Errorf("parseMountOptions(%q) = %+v, want %+v", tc.opts, got, tc.want)
		}
	}
}

func TestSecurePath(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "real/dir"), 0o755)
	os.Symlink("/real", filepath.Join(root, "abs"))
	os.Symlink("../../../../etc", filepath.Join(root, "escape"))
	os.Symlink("real/dir", filepath.Join(root, "rel"))
	os.Symlink("loop", filepath.Join(root, "loop"))
	for _, tc := range []struct {
		in, want string
		err      bool
	}{
		{"/proc", "/proc", false},
		{"/abs/dir", "/real/dir", false},
		{"/escape/passwd", "/etc/passwd", false},
		{"/../../x", "/x", false},
		{"/rel/new/file", "/real/dir/new/file", false},
		{"/loop", "", true},
	} {
		got, err := securePath(root, tc.in)
		if tc.err {
			if err == nil {
				t.Errorf("securePath(%q) = %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != filepath.Join(root, tc.want) {
			t.Errorf("securePath(%q) = %q, %v; want %q", tc.in, got, err, filepath.Join(root, tc.want))
		}
	}
}

func TestInitNamespaces(t *testing.T) {
	spec := &specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
		{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
		{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace, Path: "/proc/42/ns/net"},
		{Type: specs.CgroupNamespace},
	}}}
	flags, join, newCg, newNet, err := initNamespaces(spec)
	if err != nil {
		t.Fatal(err)
	}
	if want := uintptr(unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWNS); flags != want {
		t.Errorf("cloneflags = %#x, want %#x", flags, want)
	}
	if want := []nsJoin{{specs.NetworkNamespace, "/proc/42/ns/net"}}; !reflect.DeepEqual(join, want) {
		t.Errorf("join = %+v, want %+v", join, want)
	}
	if !newCg || newNet {
		t.Errorf("newCgroup=%v newNet=%v, want true false", newCg, newNet)
	}
	_, _, _, _, err = initNamespaces(&specs.Spec{Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.UserNamespace}}}})
	if !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("user namespace: err = %v, want ErrNotImplemented", err)
	}
	// No namespaces listed still gets a private mount namespace.
	if flags, _, _, _, _ := initNamespaces(&specs.Spec{}); flags != unix.CLONE_NEWNS {
		t.Errorf("no linux section: cloneflags = %#x, want CLONE_NEWNS", flags)
	}
}

func TestParseSpecRejects(t *testing.T) {
	for name, tc := range map[string]struct {
		json string
		want error
	}{
		"not json":      {`{`, errdefs.ErrInvalidArgument},
		"no process":    {`{"ociVersion":"1.0.2"}`, errdefs.ErrInvalidArgument},
		"no args":       {`{"process":{"cwd":"/"}}`, errdefs.ErrInvalidArgument},
		"bad cap":       {`{"process":{"args":["sh"],"capabilities":{"bounding":["CAP_NOPE"]}}}`, errdefs.ErrInvalidArgument},
		"bad rlimit":    {`{"process":{"args":["sh"],"rlimits":[{"type":"RLIMIT_NOPE"}]}}`, errdefs.ErrInvalidArgument},
		"ok, cwd fixed": {`{"process":{"args":["sh"]}}`, nil},
	} {
		spec, err := parseSpec([]byte(tc.json))
		if tc.want == nil {
			if err != nil || spec.Process.Cwd != "/" {
				t.Errorf("%s: parseSpec = %v (cwd %q), want ok with cwd /", name, err, spec.Process.Cwd)
			}
			continue
		}
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: parseSpec error = %v, want %v", name, err, tc.want)
		}
	}
}

func TestTransitions(t *testing.T) {
	ok := func(s State) struct {
		s   State
		err error
	} {
		return struct {
			s   State
			err error
		}{s, nil}
	}
	bad := func(err error) struct {
		s   State
		err error
	} {
		return struct {
			s   State
			err error
		}{-1, err}
	}
	pre, nf := errdefs.ErrFailedPrecondition, errdefs.ErrNotFound
	table := map[State]map[Op]struct {
		s   State
		err error
	}{
		Created: {OpStart: ok(Running), OpSignal: ok(Created), OpExit: ok(Stopped), OpDelete: ok(Deleted), OpResize: ok(Created), OpCloseStdin: ok(Created)},
		Running: {OpStart: bad(pre), OpSignal: ok(Running), OpExit: ok(Stopped), OpDelete: bad(pre), OpResize: ok(Running), OpCloseStdin: ok(Running)},
		Stopped: {OpStart: bad(pre), OpSignal: bad(nf), OpExit: ok(Stopped), OpDelete: ok(Deleted), OpResize: bad(pre), OpCloseStdin: ok(Stopped)},
		Deleted: {OpStart: bad(pre), OpSignal: bad(nf), OpExit: ok(Deleted), OpDelete: bad(pre), OpResize: bad(pre), OpCloseStdin: bad(pre)},
	}
	for from, ops := range table {
		for op, want := range ops {
			got, err := transition(from, op)
			if want.err != nil {
				if !errors.Is(err, want.err) {
					t.Errorf("%s + %s: err = %v, want %v", from, op, err, want.err)
				}
				if got != from {
					t.Errorf("%s + %s: state moved to %s on error", from, op, got)
				}
				continue
			}
			if err != nil || got != want.s {
				t.Errorf("%s + %s = %s, %v; want %s", from, op, got, err, want.s)
			}
		}
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "prog"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(dir, "data"), []byte("x"), 0o644)
	env := []string{"HOME=/", "PATH=/nonexistent:" + dir}
	if got, err := lookPath("prog", env); err != nil || got != filepath.Join(dir, "prog") {
		t.Errorf("lookPath(prog) = %q, %v", got, err)
	}
	_, err := lookPath("nope", env)
	if err == nil || err.Error() != `exec: "nope": executable file not found in $PATH` {
		t.Errorf("lookPath(nope) error = %v, want runc's wording", err)
	}
	if _, err := lookPath(filepath.Join(dir, "data"), env); !errors.Is(err, unix.EACCES) {
		t.Errorf("lookPath(non-executable) error = %v, want EACCES", err)
	}
	if _, err := lookPath("/no/such/file", env); !errors.Is(err, unix.ENOENT) {
		t.Errorf("lookPath(missing absolute) error = %v, want ENOENT", err)
	}
}

func TestParseOOMKills(t *testing.T) {
	b := []byte("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n")
	if got := parseOOMKills(b); got != 1 {
		t.Fatalf("parseOOMKills = %d, want 1", got)
	}
	if got := parseOOMKills([]byte("low 0\n")); got != 0 {
		t.Fatalf("parseOOMKills without oom_kill = %d, want 0", got)
	}
}

func TestCapSet(t *testing.T) {
	s := toCapSet([]string{"CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_BPF"})
	for c := 0; c <= unix.CAP_LAST_CAP; c++ {
		want := c == unix.CAP_CHOWN || c == unix.CAP_SYS_ADMIN || c == unix.CAP_BPF
		if s.has(c) != want {
			t.Errorf("cap %d: has = %v, want %v", c, s.has(c), want)
		}
	}
	if unix.CAP_BPF < 32 || s[1] == 0 {
		t.Errorf("CAP_BPF (%d) should land in the second word: %v", unix.CAP_BPF, s)
	}
}

func TestMountsOutside(t *testing.T) {
	root := "/run/macvm/c/a/rootfs"
	got := mountsOutside(root, []string{"/", "/proc", "/run", "/run/macvm/c/a/rootfs", "/run/macvm/c/a/rootfs/proc", "/run/macvm/c/b/rootfs", "/sys/fs/cgroup", "/sys"})
	want := []string{"/run/macvm/c/b/rootfs", "/sys/fs/cgroup", "/proc", "/sys"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("mountsOutside = %q, want %q", got, want)
	}
}
