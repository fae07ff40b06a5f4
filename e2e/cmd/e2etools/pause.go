package main

import (
	"os"
	"os/signal"

	"golang.org/x/sys/unix"
)

// pause stands in for Kubernetes' pause container: it does nothing until SIGTERM or SIGINT (then exits
// 0), and reaps the children it adopts as PID 1 of a pod that shares its PID namespace. Unlike a shell
// loop around sleep it runs no other process, so a `pgrep sleep` in a shared-PID pod (critest's execSync
// timeout spec) finds only the containers' own.
func pause(args []string) int {
	if len(args) > 0 {
		return fail("pause", 2, "takes no arguments")
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGCHLD)
	for s := range sigs {
		if s != unix.SIGCHLD {
			return 0
		}
		for {
			pid, err := unix.Wait4(-1, nil, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
	return 0
}
