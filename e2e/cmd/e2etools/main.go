// Command e2etools is a multi-call binary that adds to the test image the procps and util-linux
// programs Debian's static busybox lacks and the CRI tests and critest run inside containers: ipcmk,
// ipcs, ipcrm (System V shared memory) and pgrep, pause (the CRI pod sandbox's process) and nnp
// (critest's NoNewPrivs program, installed setuid root). The image builder (e2e/harness) builds it static
// (CGO_ENABLED=0) and hard-links it under each name; it picks the program from the name it runs as.
//
// Only what the tests use is implemented, with the output formats they parse: `ipcmk -M SIZE` prints
// util-linux's "Shared memory id: ID", `ipcs -m` prints util-linux's and busybox's table, `pgrep`
// prints one PID per line.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// applets maps a program name to its implementation; each returns the process's exit status.
var applets = map[string]func(args []string) int{
	"ipcmk": ipcmk,
	"ipcs":  ipcs,
	"ipcrm": ipcrm,
	"pgrep": pgrep,
	"pause": pause,
	"nnp":   nnp,
}

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name == "e2etools" && len(args) > 0 {
		name, args = args[0], args[1:]
	}
	f, ok := applets[name]
	if !ok {
		var names []string
		for n := range applets {
			names = append(names, n)
		}
		sort.Strings(names)
		fmt.Fprintf(os.Stderr, "e2etools: unknown program %q (run as one of: %s)\n", name, strings.Join(names, ", "))
		os.Exit(2)
	}
	os.Exit(f(args))
}

// fail prints a program's error the way the originals do and returns the status for it.
func fail(prog string, status int, format string, a ...any) int {
	fmt.Fprintf(os.Stderr, prog+": "+format+"\n", a...)
	return status
}

// nnp prints its effective uid as the program of Kubernetes' nonewprivs test image does. Installed
// setuid root and run as another user, it prints 0 unless no_new_privs stopped the setuid.
func nnp([]string) int {
	fmt.Printf("Effective uid: %d\n", os.Geteuid())
	return 0
}
