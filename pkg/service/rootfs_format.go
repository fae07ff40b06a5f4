package service

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// formatTemplate applies containerd's "format" transform
// (core/mount/manager/format.go) with the guest mount points: {{ mount i }}
// and {{ target i }} are disk i's mount point, {{ source i }} its image,
// {{ overlay a b }} the mount points a..b joined by ':' (in reverse when
// a > b).
//
// containerd evaluates these with text/template, but the actions are only
// ever a function name and integers (its own comment: "the formatting is very
// easy, don't use template"); parsing them here keeps text/template and its
// reflection out of the shim, ~0.3 MiB of code every running shim would map
// (docs/shim.md, "Memory"). Anything else in braces is an error naming it.
func formatTemplate(s string, active, sources []string) (string, error) {
	if !strings.Contains(s, "{{") {
		return s, nil
	}
	var b strings.Builder
	rest := s
	for {
		before, after, found := strings.Cut(rest, "{{")
		b.WriteString(before)
		if !found {
			return b.String(), nil
		}
		action, tail, closed := strings.Cut(after, "}}")
		if !closed {
			return "", fmt.Errorf("template %q: unclosed action: %w", s, errdefs.ErrInvalidArgument)
		}
		v, err := formatAction(action, active, sources)
		if err != nil {
			return "", fmt.Errorf("template %q: %w", s, err)
		}
		b.WriteString(v)
		rest = tail
	}
}

// formatAction evaluates one action: a function name and its integer
// arguments.
func formatAction(action string, active, sources []string) (string, error) {
	f := strings.Fields(action)
	if len(f) == 0 {
		return "", fmt.Errorf("empty action: %w", errdefs.ErrInvalidArgument)
	}
	args := make([]int, len(f)-1)
	for i, a := range f[1:] {
		n, err := strconv.Atoi(a)
		if err != nil {
			return "", fmt.Errorf("action {{%s}}: argument %q is not an integer: %w", action, a, errdefs.ErrInvalidArgument)
		}
		args[i] = n
	}
	want := 1
	if f[0] == "overlay" {
		want = 2
	}
	switch f[0] {
	case "mount", "target", "source", "overlay":
		if len(args) != want {
			return "", fmt.Errorf("action {{%s}}: %s takes %d arguments, got %d: %w", action, f[0], want, len(args), errdefs.ErrInvalidArgument)
		}
	default:
		return "", fmt.Errorf("action {{%s}}: unknown function %q (mount, target, source and overlay are known): %w", action, f[0], errdefs.ErrInvalidArgument)
	}
	at := func(list []string, i int) (string, error) {
		if i < 0 || i >= len(list) {
			return "", fmt.Errorf("index %d out of range (%d disks): %w", i, len(list), errdefs.ErrInvalidArgument)
		}
		return list[i], nil
	}
	switch f[0] {
	case "source":
		return at(sources, args[0])
	case "overlay":
		a, b := args[0], args[1]
		step := 1
		if a > b {
			step = -1
		}
		var dirs []string
		for i := a; ; i += step {
			d, err := at(active, i)
			if err != nil {
				return "", err
			}
			dirs = append(dirs, d)
			if i == b {
				break
			}
		}
		return strings.Join(dirs, ":"), nil
	default: // mount, target
		return at(active, args[0])
	}
}
