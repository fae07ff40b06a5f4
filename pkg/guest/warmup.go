package guest

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/timestamppb"

	agent "github.com/macvm/macvm/pkg/guest/api/v1"
)

// WarmUpContainerID names the pool's throw-away warm-up container in the
// guest. It is gone before the VM is handed to a shim, so a container of
// the same name can come later.
const WarmUpContainerID = "macvm-pool-warm-up"

// warmUp runs, in a pooled VM before it is paused, what a container's start
// will: Reseed, SetTime, and the create (stdio streams, mounts, cgroup, a
// helper building the container's world up to "ready") and delete of a
// throw-away container shaped like ctr run's, whose root is a guest tmpfs
// and whose program never starts. Under TCG the guest runs every piece of
// code (the agent's, the helper's, the kernel's) translated first, and a
// new QEMU process starts with an empty translation cache: the first
// container's create in a VM otherwise pays for translating all of it.
// The create asks for no spare helper (no_spare), which stays for the
// VM's first real container; the helper code the spare will run is the
// same agent binary's, so it is translated by the fresh helper's run.
func warmUp(ctx context.Context, c *Client) error {
	entropy := make([]byte, 64)
	if _, err := rand.Read(entropy); err != nil {
		return err
	}
	if _, err := c.Reseed(ctx, &agent.ReseedRequest{Entropy: entropy}); err != nil {
		return fmt.Errorf("warm-up Reseed: %w", err)
	}
	if _, err := c.SetTime(ctx, &agent.SetTimeRequest{Time: timestamppb.Now()}); err != nil {
		return fmt.Errorf("warm-up SetTime: %w", err)
	}
	spec, err := json.Marshal(warmUpSpec())
	if err != nil {
		return err
	}
	stdio := &agent.Stdio{Stdout: WarmUpContainerID + "-out", Stderr: WarmUpContainerID + "-err"}
	var errs []error
	for _, name := range []string{stdio.Stdout, stdio.Stderr} {
		s, err := c.OpenStream(name)
		if err != nil {
			return fmt.Errorf("warm-up stream: %w", err)
		}
		defer s.Close()
	}
	_, err = c.CreateContainer(ctx, &agent.CreateContainerRequest{
		ContainerId: WarmUpContainerID,
		Spec:        spec,
		Rootfs:      []*agent.Mount{{Type: "tmpfs", Source: "tmpfs", Options: []string{"size=1m", "mode=755"}}},
		Stdio:       stdio,
		NoSpare:     true,
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("warm-up CreateContainer: %w", err))
	}
	// Deleted even after a failed create: a half-made one may be left.
	if _, err := c.DeleteContainer(ctx, &agent.DeleteContainerRequest{ContainerId: WarmUpContainerID}); err != nil && len(errs) == 0 {
		errs = append(errs, fmt.Errorf("warm-up DeleteContainer: %w", err))
	}
	return errors.Join(errs...)
}

// warmUpSpec is the guest spec of a `ctr run` container as the shim sends
// it (containerd's defaults, the network namespace being the VM's), so that
// the warm-up takes the code paths a real create takes.
func warmUpSpec() *specs.Spec {
	caps := []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
		"CAP_KILL", "CAP_AUDIT_WRITE"}
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args: []string{"true"},
			Env:  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Cwd:  "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
			NoNewPrivileges: true,
		},
		Root: &specs.Root{Path: "rootfs"},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/run", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
				{Type: specs.MountNamespace}, {Type: specs.CgroupNamespace},
			},
			MaskedPaths: []string{"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
				"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
				"/sys/devices/virtual/powercap", "/proc/scsi"},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
		},
	}
}
