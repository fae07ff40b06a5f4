package procmem

import (
	"strings"
	"testing"
)

// smapsQEMU is trimmed from a qemu-system-x86_64 7.2 started with
// -accel tcg,tb-size=128: the code_gen_buffer (rwxp, 128 MiB less its
// guard page), the guard page, a heap mapping and a library's text.
const smapsQEMU = `7fe617fff000-7fe618000000 ---p 00000000 00:00 0 
Size:                  4 kB
KernelPageSize:        4 kB
Rss:                   0 kB
Pss:                   0 kB
7fe618800000-7fe6207ff000 rwxp 00000000 00:00 0 
Size:             131068 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:               84396 kB
Pss:               84396 kB
Pss_Anon:          84396 kB
Pss_File:              0 kB
Anonymous:         84396 kB
VmFlags: rd wr ex mr mw me ac sd hg
7fe6207ff000-7fe620800000 ---p 00000000 00:00 0 
Size:                  4 kB
KernelPageSize:        4 kB
Rss:                   0 kB
Pss:                   0 kB
7fe62241f000-7fe622420000 rw-p 00000000 00:00 0 
Size:                  4 kB
KernelPageSize:        4 kB
Rss:                   4 kB
Pss:                   4 kB
Pss_Anon:              4 kB
7fe6230a1000-7fe6231f3000 r-xp 00022000 08:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1352 kB
KernelPageSize:        4 kB
Rss:                1000 kB
Pss:                  30 kB
Pss_Anon:              0 kB
`

func TestParseCodeGenBuffer(t *testing.T) {
	u, err := ParseCodeGenBuffer(strings.NewReader(smapsQEMU), 128<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := int64(84396) << 10
	if u.RSS != want || u.PSS != want || u.Anon != want {
		t.Errorf("code_gen_buffer = %+v, want RSS = PSS = Anon = %d", u, want)
	}
	// A tb-size the mapping does not match is an error, not a figure.
	if _, err := ParseCodeGenBuffer(strings.NewReader(smapsQEMU), 64<<20); err == nil {
		t.Error("a 128 MiB buffer accepted as tb-size 64")
	}
	// No executable anonymous mapping (a KVM QEMU, or not QEMU).
	noBuffer := strings.ReplaceAll(smapsQEMU, "rwxp", "rw-p")
	if _, err := ParseCodeGenBuffer(strings.NewReader(noBuffer), 128<<20); err == nil || !strings.Contains(err.Error(), "no anonymous rwxp") {
		t.Errorf("smaps without the buffer: err = %v, want no anonymous rwxp mapping", err)
	}
	// An executable file mapping (a library's text is r-xp, but a file
	// mapped rwx must not count either).
	fileRWX := strings.Replace(smapsQEMU, "r-xp 00022000 08:01 1835", "rwxp 00022000 08:01 1835", 1)
	if u2, err := ParseCodeGenBuffer(strings.NewReader(fileRWX), 128<<20); err != nil || u2 != u {
		t.Errorf("with a file-backed rwxp mapping: %+v, %v; want only the anonymous one, %+v", u2, err, u)
	}
}

func TestTBSizeArg(t *testing.T) {
	for _, c := range []struct {
		args []string
		want int
		ok   bool
	}{
		{[]string{"qemu-system-x86_64", "-accel", "tcg,thread=single,tb-size=64", "-cpu", "qemu64"}, 64, true},
		{[]string{"qemu-system-x86_64", "-accel", "tcg,tb-size=128"}, 128, true},
		{[]string{"qemu-system-x86_64", "-accel", "kvm"}, 0, false},
		{[]string{"qemu-system-x86_64", "-accel"}, 0, false},
		{[]string{"qemu-system-x86_64", "-accel", "tcg,tb-size=x"}, 0, false},
	} {
		got, ok := TBSizeArg(c.args)
		if got != c.want || ok != c.ok {
			t.Errorf("TBSizeArg(%q) = %d, %v; want %d, %v", c.args, got, ok, c.want, c.ok)
		}
	}
}
