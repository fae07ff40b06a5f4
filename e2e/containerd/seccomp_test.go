package containerd_test

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/macvm/macvm/e2e/harness"
)

// seccompProfile denies mkdir with EACCES and symlink with ENOSYS and allows
// the rest: busybox's mkdir and ln -s then fail with those errors while
// touch works.
const seccompProfile = `{
  "defaultAction": "SCMP_ACT_ALLOW",
  "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
  "syscalls": [
    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
    {"names": ["symlink", "symlinkat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    {"names": ["no_such_syscall"], "action": "SCMP_ACT_KILL"}
  ]
}`

// seccompScript runs the denied and the allowed commands and reports their
// exit codes.
const seccompScript = `mkdir /tmp/d; echo mkdir=$?; ln -s /tmp /tmp/l; echo ln=$?; touch /tmp/f; echo touch=$?; grep -E '^Seccomp:' /proc/self/status`

// TestSeccomp: `ctr run --seccomp` runs the container under containerd's
// default profile (Seccomp: 2 in /proc/self/status, as with runc), and a
// custom profile (--seccomp-profile) makes the syscalls it denies fail
// with its errno values, in the init and in an exec, with the same results
// on both runtimes; on macvm a profile it cannot enforce fails the create.
func TestSeccomp(t *testing.T) {
	profile := filepath.Join(t.TempDir(), "profile.json")
	if err := os.WriteFile(profile, []byte(seccompProfile), 0o644); err != nil {
		t.Fatal(err)
	}
	outputs := map[string]string{}
	forEachRuntime(t, false, func(t *testing.T, rt harness.Runtime) {
		d := daemon(t, rt)
		res := run(t, d, rt, nil, []string{"--seccomp"}, "sc-default", "grep", "-E", "^Seccomp:", "/proc/self/status")
		if res.ExitCode != 0 || !regexp.MustCompile(`(?m)^Seccomp:\s+2$`).Match(res.Stdout) {
			t.Errorf("ctr run --seccomp: %v\nwant Seccomp: 2 (filter mode)", res)
		}
		res = run(t, d, rt, nil, nil, "sc-none", "grep", "-E", "^Seccomp:", "/proc/self/status")
		if res.ExitCode != 0 || !regexp.MustCompile(`(?m)^Seccomp:\s+0$`).Match(res.Stdout) {
			t.Errorf("ctr run without --seccomp: %v\nwant Seccomp: 0", res)
		}

		want := "mkdir=1\nln=1\ntouch=0\nSeccomp:\t2\n"
		res = run(t, d, rt, nil, []string{"--seccomp", "--seccomp-profile", profile}, "sc-custom", "sh", "-c", seccompScript)
		if string(res.Stdout) != want || !strings.Contains(string(res.Stderr), "Permission denied") ||
			!strings.Contains(string(res.Stderr), "Function not implemented") {
			t.Errorf("custom profile, init: %v\nwant stdout %q and EACCES, ENOSYS errors", res, want)
		}
		// busybox's error lines (ctr may add its own to stderr).
		out := string(res.Stdout)
		for _, l := range strings.Split(string(res.Stderr), "\n") {
			if strings.HasPrefix(l, "mkdir:") || strings.HasPrefix(l, "ln:") {
				out += l + "\n"
			}
		}
		outputs[rt.Short] = out

		if rt.VM {
			// A profile the guest cannot enforce fails the create, naming
			// what: it is never dropped.
			notify := filepath.Join(t.TempDir(), "notify.json")
			prof := `{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}`
			if err := os.WriteFile(notify, []byte(prof), 0o644); err != nil {
				t.Fatal(err)
			}
			res = run(t, d, rt, nil, []string{"--seccomp", "--seccomp-profile", notify}, "sc-notify", "true")
			if res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "SCMP_ACT_NOTIFY") {
				t.Errorf("a profile with SCMP_ACT_NOTIFY: %v\nwant a failed create naming SCMP_ACT_NOTIFY", res)
			}
			ctr(t, d, nil, "container", "delete", "sc-notify")
		}

		const id = "sc-exec"
		runDetached(t, d, rt, []string{"--seccomp", "--seccomp-profile", profile}, id, "sleep", "600")
		waitStatus(t, d, id, "RUNNING", 2*time.Minute)
		res = ctr(t, d, nil, "task", "exec", "--exec-id", "e1", id, "sh", "-c", seccompScript)
		if string(res.Stdout) != want {
			t.Errorf("custom profile, exec: %v\nwant stdout %q", res, want)
		}
		ctrOK(t, d, "task", "kill", "-s", "SIGKILL", id)
		exitStatus(t, d, id, 2*time.Minute)
		ctrOK(t, d, "task", "delete", id)
		ctrOK(t, d, "container", "delete", id)
	})
	if ref, ok := outputs["runc"]; ok {
		for rt, out := range outputs {
			if out != ref {
				t.Errorf("%s output differs from runc's:\n%s\nrunc:\n%s", rt, out, ref)
			}
		}
	}
}
