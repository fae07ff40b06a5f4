package boot

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// Channel says how the host reaches the agent, from the kernel command line
// (macvm.channel=KIND:NAME). The QEMU backend passes serial:agent: a
// virtio-serial port whose name is "agent". The Virtualization.framework
// backend passes vsock:PORT: the agent dials the host (CID 2) on PORT.
type Channel struct {
	Kind string
	Name string
}

// Options are the agent's settings from the kernel command line.
type Options struct {
	Channel Channel
	// Debug turns on verbose logging (macvm.debug=1).
	Debug bool
}

// ReadOptions parses /proc/cmdline.
func ReadOptions() (Options, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return Options{}, err
	}
	return ParseCmdline(string(b))
}

// ParseCmdline extracts the agent's options from a kernel command line.
// Without macvm.channel the default is serial:agent, the only channel the
// QEMU backend offers.
func ParseCmdline(cmdline string) (Options, error) {
	opts := Options{Channel: Channel{Kind: "serial", Name: "agent"}}
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "macvm.channel":
			kind, name, ok := strings.Cut(v, ":")
			if !ok || kind == "" || name == "" {
				return Options{}, fmt.Errorf("macvm.channel=%q: want KIND:NAME: %w", v, errdefs.ErrInvalidArgument)
			}
			switch kind {
			case "serial":
			case "vsock":
				if p, err := strconv.ParseUint(name, 10, 32); err != nil || p == 0 {
					return Options{}, fmt.Errorf("macvm.channel=%q: want vsock:PORT (1-4294967295): %w", v, errdefs.ErrInvalidArgument)
				}
			default:
				return Options{}, fmt.Errorf("macvm.channel kind %q: %w", kind, errdefs.ErrNotImplemented)
			}
			opts.Channel = Channel{Kind: kind, Name: name}
		case "macvm.debug":
			opts.Debug = v == "" || v == "1" || v == "true"
		}
	}
	return opts, nil
}
