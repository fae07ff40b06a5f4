// Package seccomp compiles an OCI linux.seccomp profile to a classic BPF
// program and installs it. The agent is a static Go binary without cgo, so
// libseccomp (what runc uses) is not available: the compiler is pure Go,
// with the syscall tables of github.com/elastic/go-seccomp-bpf/arch
// (generated into static arrays, zsyscalls.go) and the instruction encoding
// of golang.org/x/net/bpf. It follows runc's reading
// of the spec: unknown syscall names are skipped (the kernel lacks them),
// a rule with the default action is dropped, conditions on distinct
// arguments are ANDed, and several conditions on one argument become one
// rule each (ORed).
package seccomp

import (
	"encoding/binary"
	"fmt"
	"runtime"
	"slices"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Program is a compiled profile, ready for seccomp(2). It travels from the
// agent, which compiles it when the container is created (so a profile it
// cannot enforce fails the create), to the helper that installs it.
type Program struct {
	// Filter is the program's struct sock_filter array in the machine's
	// byte order (8 bytes an instruction).
	Filter []byte `json:"filter"`
	// Flags are the SECCOMP_FILTER_FLAG_* to install it with.
	Flags uint `json:"flags,omitempty"`
}

// Len is the number of instructions.
func (p *Program) Len() int { return len(p.Filter) / 8 }

// Instructions decodes the program.
func (p *Program) Instructions() []bpf.RawInstruction {
	out := make([]bpf.RawInstruction, p.Len())
	for i := range out {
		b := p.Filter[8*i:]
		out[i] = bpf.RawInstruction{Op: binary.NativeEndian.Uint16(b), Jt: b[2], Jf: b[3], K: binary.NativeEndian.Uint32(b[4:])}
	}
	return out
}

// archs maps the OCI architecture names to syscall tables. Only the
// guest's native architecture and the compat ABIs its kernel runs matter;
// names for others are accepted and ignored.
var archs = map[specs.Arch]*archTable{
	specs.ArchX86_64:  &tableX86_64,
	specs.ArchX86:     &tableI386,
	specs.ArchX32:     &tableX32,
	specs.ArchAARCH64: &tableAARCH64,
	specs.ArchARM:     &tableARM,
}

// x32Bit marks an x32 syscall number on x86_64 (__X32_SYSCALL_BIT).
const x32Bit = 0x40000000

// archsFor are the architectures a kernel of goarch runs: the native one
// first, which every filter allows, as libseccomp does.
func archsFor(goarch string) ([]*archTable, error) {
	switch goarch {
	case "amd64":
		return []*archTable{&tableX86_64, &tableI386, &tableX32}, nil
	case "arm64":
		return []*archTable{&tableAARCH64, &tableARM}, nil
	}
	return nil, fmt.Errorf("seccomp on %s: %w", goarch, errdefs.ErrNotImplemented)
}

// flags maps the OCI filter flags to seccomp(2)'s.
var flags = map[specs.LinuxSeccompFlag]uint{
	// Without TSYNC the filter is the exec'ing thread's, which becomes
	// the process's only thread at execve: TSYNC adds nothing there.
	"SECCOMP_FILTER_FLAG_TSYNC":     0,
	specs.LinuxSeccompFlagLog:       unix.SECCOMP_FILTER_FLAG_LOG,
	specs.LinuxSeccompFlagSpecAllow: unix.SECCOMP_FILTER_FLAG_SPEC_ALLOW,
}

// badArch is the verdict for a syscall of an architecture the profile does
// not list (libseccomp's default).
const badArch = unix.SECCOMP_RET_KILL_THREAD

// action turns an OCI action into a seccomp return value; errnoRet is
// used by ERRNO and TRACE (EPERM when unset, as runc does).
func action(a specs.LinuxSeccompAction, errnoRet *uint) (uint32, error) {
	errno := uint32(unix.EPERM)
	if errnoRet != nil {
		if *errnoRet > unix.SECCOMP_RET_DATA {
			return 0, fmt.Errorf("seccomp errnoRet %d does not fit in 16 bits: %w", *errnoRet, errdefs.ErrInvalidArgument)
		}
		errno = uint32(*errnoRet)
	}
	switch a {
	case specs.ActKill, specs.ActKillThread:
		return unix.SECCOMP_RET_KILL_THREAD, nil
	case specs.ActKillProcess:
		return unix.SECCOMP_RET_KILL_PROCESS, nil
	case specs.ActTrap:
		return unix.SECCOMP_RET_TRAP, nil
	case specs.ActErrno:
		return unix.SECCOMP_RET_ERRNO | errno, nil
	case specs.ActTrace:
		return unix.SECCOMP_RET_TRACE | errno, nil
	case specs.ActAllow:
		return unix.SECCOMP_RET_ALLOW, nil
	case specs.ActLog:
		return unix.SECCOMP_RET_LOG, nil
	case specs.ActNotify:
		return 0, fmt.Errorf("seccomp action %s (a user-space listener) is not supported by macvm: %w", a, errdefs.ErrNotImplemented)
	}
	return 0, fmt.Errorf("unknown seccomp action %q: %w", a, errdefs.ErrInvalidArgument)
}

// cond is one argument comparison.
type cond struct {
	index    uint
	op       specs.LinuxSeccompOperator
	val, two uint64
}

// rule is one way a syscall matches: all conds hold (none: always).
type rule struct {
	conds  []cond
	action uint32
}

// Compile turns an OCI seccomp profile into a program for the guest's
// architecture. It refuses what it cannot enforce (an unknown action,
// operator or flag, a notify listener), naming it.
func Compile(s *specs.LinuxSeccomp) (*Program, error) {
	return compileFor(s, runtime.GOARCH)
}

// compileFor is Compile for a kernel of goarch (the tests compile for
// both guests: arm64 under Virtualization.framework, amd64 under QEMU).
func compileFor(s *specs.LinuxSeccomp, goarch string) (*Program, error) {
	if s == nil {
		return nil, nil
	}
	if s.ListenerPath != "" {
		return nil, fmt.Errorf("seccomp listenerPath %q (SCMP_ACT_NOTIFY) is not supported by macvm: %w", s.ListenerPath, errdefs.ErrNotImplemented)
	}
	def, err := action(s.DefaultAction, s.DefaultErrnoRet)
	if err != nil {
		return nil, fmt.Errorf("defaultAction: %w", err)
	}
	var fl uint
	for _, f := range s.Flags {
		v, ok := flags[f]
		if !ok {
			return nil, fmt.Errorf("seccomp flag %q is not supported by macvm: %w", f, errdefs.ErrNotImplemented)
		}
		fl |= v
	}
	runnable, err := archsFor(goarch)
	if err != nil {
		return nil, err
	}
	// The native architecture always, plus the listed ones this kernel runs.
	use := []*archTable{runnable[0]}
	for _, name := range s.Architectures {
		if a, ok := archs[name]; ok && slices.Contains(runnable, a) && !slices.Contains(use, a) {
			use = append(use, a)
		}
	}
	// Rules per architecture and syscall number, in profile order.
	rules := make(map[*archTable]map[int][]rule, len(use))
	for _, a := range use {
		rules[a] = map[int][]rule{}
	}
	for i, sc := range s.Syscalls {
		act, err := action(sc.Action, sc.ErrnoRet)
		if err != nil {
			return nil, fmt.Errorf("syscalls[%d] %v: %w", i, sc.Names, err)
		}
		if act == def {
			continue // as runc: libseccomp refuses a rule that changes nothing
		}
		rs, err := splitRules(sc.Args, act)
		if err != nil {
			return nil, fmt.Errorf("syscalls[%d] %v: %w", i, sc.Names, err)
		}
		for _, name := range sc.Names {
			for _, a := range use {
				nr, ok := a.lookup(name)
				if !ok {
					continue // unknown to this architecture: skipped, like runc
				}
				rules[a][nr] = append(rules[a][nr], rs...)
			}
		}
	}
	raw, err := generate(use, rules, def)
	if err != nil {
		return nil, err
	}
	p := &Program{Filter: make([]byte, 8*len(raw)), Flags: fl}
	for i, r := range raw {
		b := p.Filter[8*i:]
		binary.NativeEndian.PutUint16(b, r.Op)
		b[2], b[3] = r.Jt, r.Jf
		binary.NativeEndian.PutUint32(b[4:], r.K)
	}
	return p, nil
}

// splitRules turns a syscall entry's args into rules the way runc does:
// conditions on distinct arguments make one rule (AND); when an argument
// has several conditions, each condition is a rule of its own (OR).
func splitRules(args []specs.LinuxSeccompArg, act uint32) ([]rule, error) {
	if len(args) == 0 {
		return []rule{{action: act}}, nil
	}
	var conds []cond
	seen := map[uint]bool{}
	repeated := false
	for _, a := range args {
		if a.Index > 5 {
			return nil, fmt.Errorf("seccomp argument index %d out of range 0-5: %w", a.Index, errdefs.ErrInvalidArgument)
		}
		switch a.Op {
		case specs.OpNotEqual, specs.OpLessThan, specs.OpLessEqual, specs.OpEqualTo,
			specs.OpGreaterEqual, specs.OpGreaterThan, specs.OpMaskedEqual:
		default:
			return nil, fmt.Errorf("seccomp operator %q is not supported: %w", a.Op, errdefs.ErrInvalidArgument)
		}
		repeated = repeated || seen[a.Index]
		seen[a.Index] = true
		conds = append(conds, cond{index: a.Index, op: a.Op, val: a.Value, two: a.ValueTwo})
	}
	if !repeated {
		return []rule{{conds: conds, action: act}}, nil
	}
	rs := make([]rule, len(conds))
	for i, c := range conds {
		rs[i] = rule{conds: []cond{c}, action: act}
	}
	return rs, nil
}

// Offsets in struct seccomp_data; an argument is a 64-bit value, its low
// half first (the guests, x86 and arm, are little-endian).
const (
	offNr   = 0
	offArch = 4
	offArgs = 16
)

// maxChunk bounds a run of syscall tests sharing one return instruction, so
// that their jumps to it stay short.
const maxChunk = 200

// generate lays out the program: a dispatch on the architecture, then per
// architecture the syscalls that always get one action (tests in runs
// followed by the return), the syscalls with argument conditions (a test,
// then its rules, conditional ones first: libseccomp lets the more
// specific rule win), and the default action.
func generate(use []*archTable, rules map[*archTable]map[int][]rule, def uint32) ([]bpf.RawInstruction, error) {
	var a asm
	blocks := map[*archTable]label{}
	for _, ar := range use {
		blocks[ar] = a.newLabel()
	}
	a.emit(bpf.LoadAbsolute{Off: offArch, Size: 4})
	for _, ar := range use {
		if ar.x32 {
			continue // shares x86_64's audit arch: dispatched on the number
		}
		next := a.newLabel()
		a.jump(bpf.JumpEqual, ar.audit, blocks[ar], next)
		a.define(next)
	}
	a.emit(bpf.RetConstant{Val: badArch})
	for _, ar := range use {
		a.define(blocks[ar])
		a.emit(bpf.LoadAbsolute{Off: offNr, Size: 4})
		if ar == &tableX86_64 {
			// Numbers with the x32 bit belong to the x32 ABI (-1, a
			// syscall a tracer skipped, stays here and gets the default).
			x32 := a.newLabel()
			native := a.newLabel()
			if slices.Contains(use, &tableX32) {
				x32 = blocks[&tableX32]
			}
			check := a.newLabel()
			a.jump(bpf.JumpGreaterOrEqual, x32Bit, check, native)
			a.define(check)
			a.jump(bpf.JumpEqual, 0xffffffff, native, x32)
			if !slices.Contains(use, &tableX32) {
				a.define(x32)
				a.emit(bpf.RetConstant{Val: badArch})
			}
			a.define(native)
		}
		archBlock(&a, rules[ar], def)
	}
	return a.assemble()
}

// archBlock emits the tests of one architecture; A holds the syscall
// number on entry.
func archBlock(a *asm, byNr map[int][]rule, def uint32) {
	plain := map[uint32][]int{} // action -> syscalls that always get it
	var conditional []int
	for nr, rs := range byNr {
		if len(rs) == 1 && len(rs[0].conds) == 0 {
			plain[rs[0].action] = append(plain[rs[0].action], nr)
		} else {
			conditional = append(conditional, nr)
		}
	}
	acts := make([]uint32, 0, len(plain))
	for act := range plain {
		acts = append(acts, act)
	}
	slices.Sort(acts)
	for _, act := range acts {
		nrs := plain[act]
		slices.Sort(nrs)
		for len(nrs) > 0 {
			chunk := nrs[:min(len(nrs), maxChunk)]
			nrs = nrs[len(chunk):]
			ret, after := a.newLabel(), a.newLabel()
			for i, nr := range chunk {
				next := a.newLabel()
				if i == len(chunk)-1 {
					next = after
				}
				a.jump(bpf.JumpEqual, uint32(nr), ret, next)
				if i < len(chunk)-1 {
					a.define(next)
				}
			}
			a.define(ret)
			a.emit(bpf.RetConstant{Val: act})
			a.define(after)
		}
	}
	slices.Sort(conditional)
	for _, nr := range conditional {
		body, after := a.newLabel(), a.newLabel()
		a.jump(bpf.JumpEqual, uint32(nr), body, after)
		a.define(body)
		rs := byNr[nr]
		// Conditional rules in profile order, then the first unconditional one.
		fallback := def
		found := false
		for _, r := range rs {
			if len(r.conds) == 0 {
				if !found {
					fallback, found = r.action, true
				}
				continue
			}
			fail := a.newLabel()
			for _, c := range r.conds {
				condCode(a, c, fail)
			}
			a.emit(bpf.RetConstant{Val: r.action})
			a.define(fail)
		}
		a.emit(bpf.RetConstant{Val: fallback})
		// The body always returns: only the failed test, with the
		// number still in A, comes here.
		a.define(after)
	}
	a.emit(bpf.RetConstant{Val: def})
}

// condCode emits the test of one 64-bit argument comparison, as two 32-bit
// halves: it falls through when c holds and jumps to fail when not.
func condCode(a *asm, c cond, fail label) {
	lo, hi := uint32(offArgs+8*c.index), uint32(offArgs+8*c.index+4)
	vlo, vhi := uint32(c.val), uint32(c.val>>32)
	ok := a.newLabel()
	next := func() label { return a.newLabel() }
	switch c.op {
	case specs.OpEqualTo:
		n := next()
		a.emit(bpf.LoadAbsolute{Off: hi, Size: 4})
		a.jump(bpf.JumpEqual, vhi, n, fail)
		a.define(n)
		a.emit(bpf.LoadAbsolute{Off: lo, Size: 4})
		a.jump(bpf.JumpEqual, vlo, ok, fail)
	case specs.OpNotEqual:
		n := next()
		a.emit(bpf.LoadAbsolute{Off: hi, Size: 4})
		a.jump(bpf.JumpEqual, vhi, n, ok)
		a.define(n)
		a.emit(bpf.LoadAbsolute{Off: lo, Size: 4})
		a.jump(bpf.JumpEqual, vlo, fail, ok)
	case specs.OpGreaterThan, specs.OpGreaterEqual:
		// hi > vhi, or hi == vhi and lo > (>=) vlo.
		n1, n2 := next(), next()
		a.emit(bpf.LoadAbsolute{Off: hi, Size: 4})
		a.jump(bpf.JumpGreaterThan, vhi, ok, n1)
		a.define(n1)
		a.jump(bpf.JumpEqual, vhi, n2, fail)
		a.define(n2)
		a.emit(bpf.LoadAbsolute{Off: lo, Size: 4})
		test := bpf.JumpGreaterThan
		if c.op == specs.OpGreaterEqual {
			test = bpf.JumpGreaterOrEqual
		}
		a.jump(test, vlo, ok, fail)
	case specs.OpLessThan, specs.OpLessEqual:
		// hi < vhi, or hi == vhi and lo < (<=) vlo.
		n1, n2 := next(), next()
		a.emit(bpf.LoadAbsolute{Off: hi, Size: 4})
		a.jump(bpf.JumpGreaterThan, vhi, fail, n1)
		a.define(n1)
		a.jump(bpf.JumpEqual, vhi, n2, ok)
		a.define(n2)
		a.emit(bpf.LoadAbsolute{Off: lo, Size: 4})
		test := bpf.JumpGreaterOrEqual // lo >= vlo fails LT
		if c.op == specs.OpLessEqual {
			test = bpf.JumpGreaterThan // lo > vlo fails LE
		}
		a.jump(test, vlo, fail, ok)
	case specs.OpMaskedEqual:
		// (arg & value) == valueTwo.
		n := next()
		a.emit(bpf.LoadAbsolute{Off: hi, Size: 4})
		a.emit(bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: vhi})
		a.jump(bpf.JumpEqual, uint32(c.two>>32), n, fail)
		a.define(n)
		a.emit(bpf.LoadAbsolute{Off: lo, Size: 4})
		a.emit(bpf.ALUOpConstant{Op: bpf.ALUOpAnd, Val: vlo})
		a.jump(bpf.JumpEqual, uint32(c.two), ok, fail)
	}
	a.define(ok)
}
