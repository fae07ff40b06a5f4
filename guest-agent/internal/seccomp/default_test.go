package seccomp

import (
	"testing"

	ctrdseccomp "github.com/containerd/containerd/v2/contrib/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// TestContainerdDefaultProfile compiles the profile `ctr run --seccomp`
// and CRI's RuntimeDefault use (no CAP_SYS_ADMIN): it fits the kernel's
// limit, allows what every program calls, denies what it leaves out, and
// treats clone by its flags (MASKED_EQ) and clone3 with ENOSYS.
func TestContainerdDefaultProfile(t *testing.T) {
	sp := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{
		Bounding: []string{"CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"}}}}
	p := mustCompile(t, ctrdseccomp.DefaultProfile(sp))
	t.Logf("containerd's default profile: %d instructions", p.Len())
	a := native(t)
	for _, c := range []struct {
		name string
		args [6]uint64
		want uint32
	}{
		{name: "read", want: allow},
		{name: "execve", want: allow},
		{name: "futex", want: allow},
		{name: "mkdirat", want: allow},
		{name: "reboot", want: eperm},
		{name: "kexec_load", want: eperm},
		{name: "unshare", want: eperm},
		{name: "sethostname", want: eperm},
		{name: "clone", args: [6]uint64{uint64(unix.SIGCHLD)}, want: allow},
		{name: "clone", args: [6]uint64{unix.CLONE_NEWNS | uint64(unix.SIGCHLD)}, want: eperm},
		{name: "clone3", want: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
		{name: "personality", args: [6]uint64{0}, want: allow},
		{name: "personality", args: [6]uint64{0x0400000}, want: eperm},
	} {
		if got := run(t, p, call{arch: a, nr: nr(t, a, c.name), args: c.args}); got != c.want {
			t.Errorf("%s%v: got %#x, want %#x", c.name, c.args[:1], got, c.want)
		}
	}
}
