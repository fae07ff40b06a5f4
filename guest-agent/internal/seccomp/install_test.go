package seccomp

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// envChild makes the test binary the child of TestInstall: it installs a
// filter denying mkdir with EACCES, tries mkdir itself, then execs
// /bin/mkdir, which inherits the filter.
const envChild = "MACVM_SECCOMP_TEST_CHILD"

// TestInstall loads a compiled filter into the host's kernel, with
// no_new_privs and (as root, holding CAP_SYS_ADMIN) without: the kernel
// accepts the program, and it holds for the thread and across execve.
func TestInstall(t *testing.T) {
	if mode := os.Getenv(envChild); mode != "" {
		installChild(mode)
		return
	}
	if _, err := os.Stat("/bin/mkdir"); err != nil {
		t.Skip("no /bin/mkdir to exec under the filter")
	}
	modes := []string{"nnp"}
	if os.Geteuid() == 0 {
		modes = append(modes, "admin")
	}
	for _, mode := range modes {
		dir := filepath.Join(t.TempDir(), "d")
		cmd := exec.Command(os.Args[0], "-test.run=^TestInstall$", "-test.v")
		cmd.Env = append(os.Environ(), envChild+"="+mode, "DIR="+dir)
		out, _ := cmd.CombinedOutput()
		if !strings.Contains(string(out), "child mkdir: permission denied") ||
			!strings.Contains(string(out), "Permission denied") || !strings.Contains(string(out), "Seccomp:\t2") {
			t.Errorf("%s: the filter did not hold:\n%s", mode, out)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("%s: %s was made under the filter", mode, dir)
		}
	}
}

func installChild(mode string) {
	runtime.LockOSThread()
	p, err := Compile(&specs.LinuxSeccomp{DefaultAction: specs.ActAllow, Syscalls: []specs.LinuxSyscall{
		{Names: []string{"mkdir", "mkdirat"}, Action: specs.ActErrno, ErrnoRet: func() *uint { v := uint(unix.EACCES); return &v }()}}})
	if err == nil && mode == "nnp" {
		err = unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
	}
	if err == nil {
		err = Install(p)
	}
	if err != nil {
		fmt.Println("child:", err)
		os.Exit(2)
	}
	dir := os.Getenv("DIR")
	fmt.Println("child mkdir:", unix.Mkdir(dir, 0o755))
	status, _ := os.ReadFile("/proc/thread-self/status")
	for _, l := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(l, "Seccomp:") {
			fmt.Println(l)
		}
	}
	os.Stdout.Sync()
	err = unix.Exec("/bin/mkdir", []string{"mkdir", dir}, os.Environ())
	fmt.Println("exec:", err)
	os.Exit(2)
}
