package seccomp

import (
	"fmt"

	"github.com/containerd/errdefs"
	"golang.org/x/net/bpf"
)

// maxInsns is the kernel's limit on a classic BPF program (BPF_MAXINSNS).
const maxInsns = 4096

// label names a position in a program being built; jumps name labels and
// asm resolves them to offsets once the program's layout is known.
type label int

// op is one element of a program being built: an instruction with fixed
// operands, a conditional jump to two labels, an unconditional jump to a
// label, or a label's definition.
type op struct {
	ins    bpf.Instruction // fixed instruction (nil for the others)
	cond   bool            // conditional jump: test, val, jt, jf
	test   bpf.JumpTest
	val    uint32
	jt, jf label
	ja     bool // unconditional jump to jt
	def    bool // definition of label jt
}

// asm builds a classic BPF program whose jumps go to labels. A classic
// conditional jump reaches at most 255 instructions ahead; a filter with
// hundreds of syscalls needs longer ones, so assemble widens a conditional
// jump that does not reach into "jcond; ja T; ja F" (ja has a 32-bit
// offset), repeating until every jump reaches.
type asm struct {
	ops    []op
	labels int
}

func (a *asm) newLabel() label { a.labels++; return label(a.labels) }

func (a *asm) emit(ins bpf.Instruction) { a.ops = append(a.ops, op{ins: ins}) }

func (a *asm) jump(test bpf.JumpTest, val uint32, jt, jf label) {
	a.ops = append(a.ops, op{cond: true, test: test, val: val, jt: jt, jf: jf})
}

func (a *asm) ja(to label) { a.ops = append(a.ops, op{ja: true, jt: to}) }

func (a *asm) define(l label) { a.ops = append(a.ops, op{def: true, jt: l}) }

// here defines a new label at the current position and returns it.
func (a *asm) here() label { l := a.newLabel(); a.define(l); return l }

// assemble lays the program out and encodes it.
func (a *asm) assemble() ([]bpf.RawInstruction, error) {
	wide := make([]bool, len(a.ops))
	var pos []int
	where := map[label]int{}
	for {
		pos = make([]int, len(a.ops))
		n := 0
		for i, o := range a.ops {
			pos[i] = n
			switch {
			case o.def:
				where[o.jt] = n
			case o.cond && wide[i]:
				n += 3
			default:
				n++
			}
		}
		grew := false
		for i, o := range a.ops {
			if !o.cond || wide[i] {
				continue
			}
			t, okT := where[o.jt]
			f, okF := where[o.jf]
			if !okT || !okF {
				return nil, fmt.Errorf("seccomp: jump to an undefined label: %w", errdefs.ErrInternal)
			}
			if t-pos[i]-1 > 255 || f-pos[i]-1 > 255 {
				wide[i], grew = true, true
			}
		}
		if !grew {
			break
		}
	}
	var prog []bpf.Instruction
	for i, o := range a.ops {
		switch {
		case o.def:
		case o.ins != nil:
			prog = append(prog, o.ins)
		case o.ja:
			off := where[o.jt] - pos[i] - 1
			if off < 0 {
				return nil, fmt.Errorf("seccomp: backward jump: %w", errdefs.ErrInternal)
			}
			prog = append(prog, bpf.Jump{Skip: uint32(off)})
		case o.cond && wide[i]:
			t, f := where[o.jt]-pos[i]-2, where[o.jf]-pos[i]-3
			if t < 0 || f < 0 {
				return nil, fmt.Errorf("seccomp: backward jump: %w", errdefs.ErrInternal)
			}
			prog = append(prog,
				bpf.JumpIf{Cond: o.test, Val: o.val, SkipTrue: 0, SkipFalse: 1},
				bpf.Jump{Skip: uint32(t)},
				bpf.Jump{Skip: uint32(f)})
		default:
			t, f := where[o.jt]-pos[i]-1, where[o.jf]-pos[i]-1
			if t < 0 || f < 0 {
				return nil, fmt.Errorf("seccomp: backward jump: %w", errdefs.ErrInternal)
			}
			prog = append(prog, bpf.JumpIf{Cond: o.test, Val: o.val, SkipTrue: uint8(t), SkipFalse: uint8(f)})
		}
	}
	if len(prog) > maxInsns {
		return nil, fmt.Errorf("seccomp profile compiles to %d BPF instructions, more than the kernel's %d: %w", len(prog), maxInsns, errdefs.ErrInvalidArgument)
	}
	return bpf.Assemble(prog)
}
