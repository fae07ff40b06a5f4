package service

import (
	"bytes"
	"context"
	"slices"
	"testing"

	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go/features"
)

// TestInfoFeatures checks what containerd's CRI reads from `-info`: OCI features whose mount options
// include "rro" (it then offers recursive read-only volumes on the macvm handler).
func TestInfoFeatures(t *testing.T) {
	info, err := NewManager("io.containerd.macvm.v1").Info(context.Background(), bytes.NewReader(nil))
	if err != nil {
		t.Fatal(err)
	}
	if info.Features == nil {
		t.Fatal("RuntimeInfo has no Features")
	}
	v, err := typeurl.UnmarshalAny(info.Features)
	if err != nil {
		t.Fatalf("Features %s: %v", info.Features.GetTypeUrl(), err)
	}
	f, ok := v.(*features.Features)
	if !ok {
		t.Fatalf("Features is a %T, want *features.Features", v)
	}
	if !slices.Contains(f.MountOptions, "rro") {
		t.Errorf("mount options %v lack rro", f.MountOptions)
	}
}
