package service

import (
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

func TestDirectRootfs(t *testing.T) {
	for _, tt := range []struct {
		name   string
		mounts []mount.Mount
		want   string
		ok     bool
	}{
		{"native snapshotter", []mount.Mount{{Type: "bind", Source: "/var/lib/containerd/snapshots/3/fs", Options: []string{"rw", "rbind"}}}, "/var/lib/containerd/snapshots/3/fs", true},
		{"bind by option", []mount.Mount{{Type: "none", Source: "/snap/fs/", Options: []string{"rbind", "ro"}}}, "/snap/fs", true},
		{"overlay", []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a:/b"}}}, "", false},
		{"erofs layers", []mount.Mount{{Type: "erofs", Source: "/l/layer.erofs", Options: []string{"ro", "loop"}}, {Type: "format/mkdir/overlay", Source: "overlay"}}, "", false},
		{"relative", []mount.Mount{{Type: "bind", Source: "fs"}}, "", false},
		{"none", nil, "", false},
	} {
		got, ok := directRootfs(tt.mounts)
		if got != tt.want || ok != tt.ok {
			t.Errorf("%s: got %q %v, want %q %v", tt.name, got, ok, tt.want, tt.ok)
		}
	}
}
