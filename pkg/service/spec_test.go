package service

import (
	"io/fs"
	"os"
	"reflect"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/macvm/macvm/pkg/vm"
)

type fakeInfo struct {
	name string
	mode fs.FileMode
}

func (f fakeInfo) Name() string       { return f.name }
func (f fakeInfo) Size() int64        { return 0 }
func (f fakeInfo) Mode() fs.FileMode  { return f.mode }
func (f fakeInfo) ModTime() time.Time { return time.Time{} }
func (f fakeInfo) IsDir() bool        { return f.mode.IsDir() }
func (f fakeInfo) Sys() any           { return nil }

func TestRewriteBindMounts(t *testing.T) {
	files := map[string]fs.FileMode{
		"/data":                 fs.ModeDir,
		"/data/":                fs.ModeDir,
		"/cfg/hosts":            0,
		"/cfg/resolv.conf":      0,
		"/ro":                   fs.ModeDir,
		"/dev/null":             fs.ModeDevice | fs.ModeCharDevice,
		"/var/lib/x/etc/passwd": 0,
	}
	stat := func(p string) (os.FileInfo, error) {
		m, ok := files[p]
		if !ok {
			return nil, fs.ErrNotExist
		}
		return fakeInfo{p, m}, nil
	}
	spec := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/data", Type: "bind", Source: "/data", Options: []string{"rbind", "rw"}},
		{Destination: "/etc/hosts", Type: "bind", Source: "/cfg/hosts", Options: []string{"rbind", "ro"}},
		{Destination: "/etc/resolv.conf", Type: "bind", Source: "/cfg/resolv.conf", Options: []string{"rbind", "ro"}},
		{Destination: "/mnt/ro", Source: "/ro", Options: []string{"bind", "ro"}},
		{Destination: "/again", Type: "bind", Source: "/data/", Options: []string{"rbind", "ro"}},
		{Destination: "/dev/null2", Type: "bind", Source: "/dev/null", Options: []string{"bind"}},
	}}
	shares, err := rewriteBindMounts(spec, stat)
	if err != nil {
		t.Fatal(err)
	}
	wantShares := []vm.Share{
		{Tag: "b0", HostPath: "/data", ReadOnly: false},
		{Tag: "b1", HostPath: "/cfg", ReadOnly: true},
		{Tag: "b2", HostPath: "/ro", ReadOnly: true},
	}
	if !reflect.DeepEqual(shares, wantShares) {
		t.Errorf("shares:\n got %+v\nwant %+v", shares, wantShares)
	}
	nineP := func(opts ...string) []string { return append(opts, ninePOptions...) }
	want := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/data", Type: "9p", Source: "b0", Options: nineP("rw")},
		{Destination: "/etc/hosts", Type: "bind", Source: "/run/macvm/shares/b1/hosts", Options: []string{"rbind", "ro"}},
		{Destination: "/etc/resolv.conf", Type: "bind", Source: "/run/macvm/shares/b1/resolv.conf", Options: []string{"rbind", "ro"}},
		{Destination: "/mnt/ro", Type: "9p", Source: "b2", Options: nineP("ro")},
		{Destination: "/again", Type: "9p", Source: "b0", Options: nineP("ro")},
		{Destination: "/dev/null2", Type: "bind", Source: "/dev/null", Options: []string{"bind"}},
	}
	for i := range want {
		if !reflect.DeepEqual(spec.Mounts[i], want[i]) {
			t.Errorf("mount %d:\n got %+v\nwant %+v", i, spec.Mounts[i], want[i])
		}
	}

	for name, bad := range map[string]specs.Mount{
		"relative source": {Destination: "/x", Type: "bind", Source: "data"},
		"missing source":  {Destination: "/x", Type: "bind", Source: "/nope"},
	} {
		if _, err := rewriteBindMounts(&specs.Spec{Mounts: []specs.Mount{bad}}, stat); err == nil {
			t.Errorf("%s: want an error", name)
		}
	}
}

func TestGuestSpecDropsHooks(t *testing.T) {
	spec := &specs.Spec{
		Hooks:  &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/bin/true"}}},
		Mounts: []specs.Mount{{Destination: "/tmp/x", Type: "bind", Source: os.TempDir()}},
	}
	gs, shares, err := guestSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	if gs.Hooks != nil {
		t.Error("hooks must not reach the guest")
	}
	if spec.Hooks == nil || spec.Mounts[0].Source != os.TempDir() {
		t.Error("the host's spec must not be modified")
	}
	if len(shares) != 1 || gs.Mounts[0].Source != "b0" || gs.Mounts[0].Type != "9p" {
		t.Errorf("got shares %+v, mount %+v", shares, gs.Mounts[0])
	}
}
