package service

import (
	"errors"
	"testing"

	"github.com/containerd/errdefs"
)

func TestFormatTemplate(t *testing.T) {
	active := []string{"/d/0", "/d/1", "/d/2", "/d/3"}
	sources := []string{"/img/0", "/img/1", "/img/2", "/img/3"}
	for _, c := range []struct{ in, want string }{
		{"plain", "plain"},
		{"{{ mount 0 }}", "/d/0"},
		{"{{mount 2}}/upper", "/d/2/upper"},
		{"X-containerd.mkdir.path={{ mount 0 }}/work:0755", "X-containerd.mkdir.path=/d/0/work:0755"},
		{"{{ target 1 }}", "/d/1"},
		{"{{ source 3 }}", "/img/3"},
		{"lowerdir={{ overlay 1 3 }}", "lowerdir=/d/1:/d/2:/d/3"},
		{"lowerdir={{ overlay 3 1 }}", "lowerdir=/d/3:/d/2:/d/1"},
		{"lowerdir={{ overlay 2 2 }}", "lowerdir=/d/2"},
		{"a={{ mount 0 }},b={{ mount 1 }}", "a=/d/0,b=/d/1"},
	} {
		got, err := formatTemplate(c.in, active, sources)
		if err != nil || got != c.want {
			t.Errorf("formatTemplate(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{
		"{{ mount 4 }}", "{{ mount -1 }}", "{{ overlay 0 4 }}", "{{ source 9 }}",
		"{{ mount }}", "{{ mount 1 2 }}", "{{ overlay 1 }}", "{{ mount x }}",
		"{{ lower 0 }}", "{{ }}", "{{ mount 0 ", "{{- mount 0 -}}",
	} {
		if got, err := formatTemplate(bad, active, sources); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("formatTemplate(%q) = %q, %v; want an invalid-argument error", bad, got, err)
		}
	}
}
