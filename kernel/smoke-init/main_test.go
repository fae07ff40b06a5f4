//go:build linux

package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestParseFilesystems(t *testing.T) {
	in := "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\t9p\n\n"
	got := parseFilesystems(in)
	want := []string{"sysfs", "tmpfs", "ext4", "9p"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseFilesystems() = %q, want %q", got, want)
	}
}

func TestDifference(t *testing.T) {
	for _, tc := range []struct {
		want, got, missing []string
	}{
		{[]string{"a", "b"}, []string{"b", "a"}, nil},
		{[]string{"a", "b", "c"}, []string{"b"}, []string{"a", "c"}},
		{[]string{"a"}, nil, []string{"a"}},
	} {
		if m := difference(tc.want, tc.got); !reflect.DeepEqual(m, tc.missing) {
			t.Errorf("difference(%q, %q) = %q, want %q", tc.want, tc.got, m, tc.missing)
		}
	}
}

func TestFindPort(t *testing.T) {
	class := t.TempDir()
	for dev, name := range map[string]string{"vport0p0": "other", "vport0p1": "agent"} {
		if err := os.Mkdir(filepath.Join(class, dev), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(class, dev, "name"), []byte(name+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := findPort(class, "agent"); err != nil || got != "vport0p1" {
		t.Errorf("findPort(agent) = %q, %v, want vport0p1", got, err)
	}
	if got, err := findPort(class, "missing"); err == nil {
		t.Errorf("findPort(missing) = %q, want an error", got)
	}
}
