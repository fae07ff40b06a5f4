package seccomp

import (
	"encoding/binary"
	"errors"
	"runtime"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// call is one syscall as the filter sees it.
type call struct {
	arch *archTable
	nr   int
	args [6]uint64
}

// run evaluates p on c in x/net/bpf's VM. The VM loads words big-endian
// (network order), so the test's seccomp_data has each 32-bit word in that
// order at the offset the kernel's little-endian layout puts it: an
// argument's low half at 16+8i, its high half at 20+8i.
func run(t *testing.T, p *Program, c call) uint32 {
	t.Helper()
	raw := p.Instructions()
	ins := make([]bpf.Instruction, len(raw))
	for i, r := range raw {
		ins[i] = r.Disassemble()
	}
	vm, err := bpf.NewVM(ins)
	if err != nil {
		t.Fatalf("program rejected by the BPF VM: %v", err)
	}
	data := make([]byte, 64)
	nr := uint32(c.nr)
	binary.BigEndian.PutUint32(data[0:], nr)
	binary.BigEndian.PutUint32(data[4:], c.arch.audit)
	for i, a := range c.args {
		binary.BigEndian.PutUint32(data[16+8*i:], uint32(a))
		binary.BigEndian.PutUint32(data[20+8*i:], uint32(a>>32))
	}
	v, err := vm.Run(data)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return uint32(v)
}

func native(t *testing.T) *archTable {
	as, err := archsFor(runtime.GOARCH)
	if err != nil {
		t.Fatal(err)
	}
	return as[0]
}

func nr(t *testing.T, a *archTable, name string) int {
	t.Helper()
	n, ok := a.lookup(name)
	if !ok {
		t.Fatalf("%s has no syscall %s", a.name, name)
	}
	return n
}

func uintp(v uint) *uint { return &v }

const (
	allow = unix.SECCOMP_RET_ALLOW
	eperm = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
)

func mustCompile(t *testing.T, s *specs.LinuxSeccomp) *Program {
	t.Helper()
	p, err := Compile(s)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return p
}

// TestAllowList is a containerd-default-like profile: deny by default,
// allow a long list (every syscall of the architecture but a few, so the
// program needs the widened long jumps), for the native and compat ABIs.
func TestAllowList(t *testing.T) {
	a := native(t)
	denied := map[string]bool{"sethostname": true, "mkdirat": true, "uname": true}
	var names []string
	for _, sc := range a.syscalls {
		if !denied[sc.name] {
			names = append(names, sc.name)
		}
	}
	names = append(names, "no_such_syscall_in_any_kernel")
	s := &specs.LinuxSeccomp{
		DefaultAction: specs.ActErrno,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchX86, specs.ArchX32, specs.ArchAARCH64, specs.ArchARM, specs.ArchS390X},
		Syscalls:      []specs.LinuxSyscall{{Names: names, Action: specs.ActAllow}},
	}
	p := mustCompile(t, s)
	t.Logf("%d syscalls allowed: %d instructions", len(names), p.Len())
	for _, name := range names[:len(names)-1] {
		if got := run(t, p, call{arch: a, nr: nr(t, a, name)}); got != allow {
			t.Errorf("%s: got %#x, want allow", name, got)
		}
	}
	for name := range denied {
		if got := run(t, p, call{arch: a, nr: nr(t, a, name)}); got != eperm {
			t.Errorf("%s: got %#x, want EPERM", name, got)
		}
	}
	if got := run(t, p, call{arch: a, nr: 4000}); got != eperm {
		t.Errorf("unknown number: got %#x, want EPERM", got)
	}
	if runtime.GOARCH != "amd64" {
		return
	}
	for _, c := range []struct {
		arch *archTable
		name string
		want uint32
	}{
		{&tableI386, "getpid", allow},
		{&tableI386, "sethostname", eperm},
		{&tableX32, "getpid", allow},
		{&tableX32, "uname", eperm},
		{&tableAARCH64, "getpid", badArch}, // not an x86 kernel's ABI
	} {
		if got := run(t, p, call{arch: c.arch, nr: nr(t, c.arch, c.name)}); got != c.want {
			t.Errorf("%s %s: got %#x, want %#x", c.arch.name, c.name, got, c.want)
		}
	}
}

// TestArchitectures: the native architecture is always allowed; the compat
// ones only when listed, else they get the bad-architecture verdict.
func TestArchitectures(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the compat ABIs checked here are x86's")
	}
	p := mustCompile(t, &specs.LinuxSeccomp{DefaultAction: specs.ActAllow,
		Syscalls: []specs.LinuxSyscall{{Names: []string{"getpid"}, Action: specs.ActErrno}}})
	for _, c := range []struct {
		call call
		want uint32
	}{
		{call{arch: &tableX86_64, nr: nr(t, &tableX86_64, "getpid")}, eperm},
		{call{arch: &tableX86_64, nr: nr(t, &tableX86_64, "getppid")}, allow},
		{call{arch: &tableI386, nr: nr(t, &tableI386, "getppid")}, badArch},
		{call{arch: &tableX32, nr: nr(t, &tableX32, "getppid")}, badArch},
		// -1 is a syscall a tracer skipped: the default, not x32.
		{call{arch: &tableX86_64, nr: -1}, allow},
	} {
		if got := run(t, p, c.call); got != c.want {
			t.Errorf("%s %d: got %#x, want %#x", c.call.arch.name, c.call.nr, got, c.want)
		}
	}
}

// TestActions: each action's return value, with per-rule and default
// errno values.
func TestActions(t *testing.T) {
	a := native(t)
	s := &specs.LinuxSeccomp{
		DefaultAction:   specs.ActErrno,
		DefaultErrnoRet: uintp(uint(unix.ENOSYS)),
		Syscalls: []specs.LinuxSyscall{
			{Names: []string{"getpid"}, Action: specs.ActAllow},
			{Names: []string{"mkdirat"}, Action: specs.ActErrno, ErrnoRet: uintp(uint(unix.EACCES))},
			{Names: []string{"uname"}, Action: specs.ActErrno},
			{Names: []string{"getuid"}, Action: specs.ActKill},
			{Names: []string{"getgid"}, Action: specs.ActKillProcess},
			{Names: []string{"getppid"}, Action: specs.ActTrap},
			{Names: []string{"gettid"}, Action: specs.ActLog},
			{Names: []string{"geteuid"}, Action: specs.ActTrace, ErrnoRet: uintp(7)},
			// Same as the default: dropped, as runc does.
			{Names: []string{"getegid"}, Action: specs.ActErrno, ErrnoRet: uintp(uint(unix.ENOSYS))},
		},
	}
	p := mustCompile(t, s)
	for name, want := range map[string]uint32{
		"getpid":  allow,
		"mkdirat": unix.SECCOMP_RET_ERRNO | uint32(unix.EACCES),
		"uname":   eperm,
		"getuid":  unix.SECCOMP_RET_KILL_THREAD,
		"getgid":  unix.SECCOMP_RET_KILL_PROCESS,
		"getppid": unix.SECCOMP_RET_TRAP,
		"gettid":  unix.SECCOMP_RET_LOG,
		"geteuid": unix.SECCOMP_RET_TRACE | 7,
		"getegid": unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS),
		"getpgid": unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS),
	} {
		if got := run(t, p, call{arch: a, nr: nr(t, a, name)}); got != want {
			t.Errorf("%s: got %#x, want %#x", name, got, want)
		}
	}
}

// TestOperators checks each comparison on 64-bit values whose halves
// differ, so that both the high and the low word decide.
func TestOperators(t *testing.T) {
	a := native(t)
	const big = 0x1_0000_0005
	cases := []struct {
		op       specs.LinuxSeccompOperator
		val, two uint64
		arg      uint64
		match    bool
	}{
		{specs.OpEqualTo, big, 0, big, true},
		{specs.OpEqualTo, big, 0, 5, false},
		{specs.OpEqualTo, big, 0, 0x2_0000_0005, false},
		{specs.OpNotEqual, big, 0, big, false},
		{specs.OpNotEqual, big, 0, 5, true},
		{specs.OpNotEqual, big, 0, big + 1, true},
		{specs.OpGreaterThan, big, 0, big + 1, true},
		{specs.OpGreaterThan, big, 0, big, false},
		{specs.OpGreaterThan, big, 0, 0x2_0000_0000, true},
		{specs.OpGreaterThan, big, 0, 0xffff_ffff, false},
		{specs.OpGreaterEqual, big, 0, big, true},
		{specs.OpGreaterEqual, big, 0, big - 1, false},
		{specs.OpGreaterEqual, big, 0, 0x2_0000_0000, true},
		{specs.OpLessThan, big, 0, big - 1, true},
		{specs.OpLessThan, big, 0, big, false},
		{specs.OpLessThan, big, 0, 0xffff_ffff, true},
		{specs.OpLessThan, big, 0, 0x2_0000_0000, false},
		{specs.OpLessEqual, big, 0, big, true},
		{specs.OpLessEqual, big, 0, big + 1, false},
		{specs.OpLessEqual, big, 0, 6, true},
		// (arg & value) == valueTwo
		{specs.OpMaskedEqual, 0x7E020000, 0, 0x11, true},
		{specs.OpMaskedEqual, 0x7E020000, 0, 0x10000000 | 0x11, false},
		{specs.OpMaskedEqual, 0xff_0000_00ff, 0x12_0000_0034, 0x12_ffff_ff34, true},
		{specs.OpMaskedEqual, 0xff_0000_00ff, 0x12_0000_0034, 0x13_0000_0034, false},
	}
	for _, c := range cases {
		// The condition is on argument 2, to check the offsets too.
		p := mustCompile(t, &specs.LinuxSeccomp{DefaultAction: specs.ActErrno, Syscalls: []specs.LinuxSyscall{{
			Names: []string{"ioctl"}, Action: specs.ActAllow,
			Args: []specs.LinuxSeccompArg{{Index: 2, Op: c.op, Value: c.val, ValueTwo: c.two}},
		}}})
		want := eperm
		if c.match {
			want = allow
		}
		var args [6]uint64
		args[2] = c.arg
		args[1] = ^c.arg // a neighbour that must not matter
		if got := run(t, p, call{arch: a, nr: nr(t, a, "ioctl"), args: args}); got != want {
			t.Errorf("%s %#x (two %#x) on %#x: got %#x, want %#x", c.op, c.val, c.two, c.arg, got, want)
		}
	}
}

// TestRuleCombination: conditions on distinct arguments are ANDed,
// several on one argument ORed (runc's reading); a conditional rule wins
// over an unconditional one of the same syscall.
func TestRuleCombination(t *testing.T) {
	a := native(t)
	s := &specs.LinuxSeccomp{
		DefaultAction: specs.ActErrno,
		Syscalls: []specs.LinuxSyscall{
			{Names: []string{"personality"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				{Index: 0, Op: specs.OpEqualTo, Value: 0},
				{Index: 0, Op: specs.OpEqualTo, Value: 8},
				{Index: 0, Op: specs.OpEqualTo, Value: 0xffffffff},
			}},
			{Names: []string{"socket"}, Action: specs.ActAllow, Args: []specs.LinuxSeccompArg{
				{Index: 0, Op: specs.OpEqualTo, Value: 1},
				{Index: 1, Op: specs.OpEqualTo, Value: 2},
			}},
			{Names: []string{"kill"}, Action: specs.ActAllow},
			{Names: []string{"kill"}, Action: specs.ActErrno, ErrnoRet: uintp(uint(unix.ESRCH)), Args: []specs.LinuxSeccompArg{
				{Index: 0, Op: specs.OpEqualTo, Value: 1},
			}},
		},
	}
	p := mustCompile(t, s)
	for _, c := range []struct {
		name string
		args [6]uint64
		want uint32
	}{
		{"personality", [6]uint64{0}, allow},
		{"personality", [6]uint64{8}, allow},
		{"personality", [6]uint64{0xffffffff}, allow},
		{"personality", [6]uint64{5}, eperm},
		{"socket", [6]uint64{1, 2}, allow},
		{"socket", [6]uint64{1, 3}, eperm},
		{"socket", [6]uint64{2, 2}, eperm},
		{"kill", [6]uint64{1, 9}, unix.SECCOMP_RET_ERRNO | uint32(unix.ESRCH)},
		{"kill", [6]uint64{42, 9}, allow},
	} {
		if got := run(t, p, call{arch: a, nr: nr(t, a, c.name), args: c.args}); got != c.want {
			t.Errorf("%s%v: got %#x, want %#x", c.name, c.args[:2], got, c.want)
		}
	}
}

// TestRefused: what the agent cannot enforce fails, naming it.
func TestRefused(t *testing.T) {
	for name, c := range map[string]struct {
		s     specs.LinuxSeccomp
		class error
	}{
		"notify": {specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
			{Names: []string{"mkdir"}, Action: specs.ActNotify}}}, errdefs.ErrNotImplemented},
		"listener":       {specs.LinuxSeccomp{DefaultAction: specs.ActAllow, ListenerPath: "/run/l.sock"}, errdefs.ErrNotImplemented},
		"unknown action": {specs.LinuxSeccomp{DefaultAction: "SCMP_ACT_MAYBE"}, errdefs.ErrInvalidArgument},
		"unknown op": {specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
			{Names: []string{"mkdir"}, Action: specs.ActErrno, Args: []specs.LinuxSeccompArg{{Index: 0, Op: "SCMP_CMP_ODD"}}}}}, errdefs.ErrInvalidArgument},
		"index": {specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
			{Names: []string{"mkdir"}, Action: specs.ActErrno, Args: []specs.LinuxSeccompArg{{Index: 6, Op: specs.OpEqualTo}}}}}, errdefs.ErrInvalidArgument},
		"flag":  {specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Flags: []specs.LinuxSeccompFlag{specs.LinuxSeccompFlagWaitKillableRecv}}, errdefs.ErrNotImplemented},
		"errno": {specs.LinuxSeccomp{DefaultAction: specs.ActErrno, DefaultErrnoRet: uintp(1 << 16)}, errdefs.ErrInvalidArgument},
	} {
		_, err := Compile(&c.s)
		if err == nil || !errors.Is(err, c.class) {
			t.Errorf("%s: got %v, want a %v error", name, err, c.class)
		}
	}
	p, err := Compile(&specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Flags: []specs.LinuxSeccompFlag{
		"SECCOMP_FILTER_FLAG_TSYNC", specs.LinuxSeccompFlagLog, specs.LinuxSeccompFlagSpecAllow}})
	if err != nil {
		t.Fatal(err)
	}
	if p.Flags != unix.SECCOMP_FILTER_FLAG_LOG|unix.SECCOMP_FILTER_FLAG_SPEC_ALLOW {
		t.Errorf("flags %#x", p.Flags)
	}
}

// TestArm64Guest compiles for the arm64 guest (macOS, Virtualization.framework)
// whatever the test machine is: aarch64 numbers, the arm compat ABI when
// listed, x86 killed.
func TestArm64Guest(t *testing.T) {
	s := &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchAARCH64, specs.ArchARM},
		Syscalls: []specs.LinuxSyscall{
			// aarch64 has no mkdir, only mkdirat: the unknown name is skipped.
			{Names: []string{"mkdir", "mkdirat"}, Action: specs.ActErrno, ErrnoRet: uintp(uint(unix.EACCES))},
			{Names: []string{"clone"}, Action: specs.ActErrno, Args: []specs.LinuxSeccompArg{
				{Index: 0, Op: specs.OpMaskedEqual, Value: unix.CLONE_NEWUSER, ValueTwo: unix.CLONE_NEWUSER}}},
		},
	}
	p, err := compileFor(s, "arm64")
	if err != nil {
		t.Fatal(err)
	}
	eacces := unix.SECCOMP_RET_ERRNO | uint32(13)
	for _, c := range []struct {
		call call
		want uint32
	}{
		{call{arch: &tableAARCH64, nr: nr(t, &tableAARCH64, "mkdirat")}, eacces},
		{call{arch: &tableAARCH64, nr: nr(t, &tableAARCH64, "getpid")}, allow},
		{call{arch: &tableAARCH64, nr: nr(t, &tableAARCH64, "clone"), args: [6]uint64{unix.CLONE_NEWUSER | 17}}, eperm},
		{call{arch: &tableAARCH64, nr: nr(t, &tableAARCH64, "clone"), args: [6]uint64{17}}, allow},
		{call{arch: &tableARM, nr: nr(t, &tableARM, "mkdir")}, eacces},
		{call{arch: &tableARM, nr: nr(t, &tableARM, "getpid")}, allow},
		{call{arch: &tableX86_64, nr: nr(t, &tableX86_64, "getpid")}, badArch},
	} {
		if got := run(t, p, c.call); got != c.want {
			t.Errorf("%s %d: got %#x, want %#x", c.call.arch.name, c.call.nr, got, c.want)
		}
	}
	if _, err := compileFor(s, "riscv64"); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("riscv64: %v, want not implemented", err)
	}
}
