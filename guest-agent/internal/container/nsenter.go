package container

import (
	"fmt"
	"os"
	"runtime"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// nsCloneFlag is the setns(2) type argument per namespace type.
var nsCloneFlag = map[specs.LinuxNamespaceType]int{
	specs.PIDNamespace:     unix.CLONE_NEWPID,
	specs.MountNamespace:   unix.CLONE_NEWNS,
	specs.UTSNamespace:     unix.CLONE_NEWUTS,
	specs.IPCNamespace:     unix.CLONE_NEWIPC,
	specs.NetworkNamespace: unix.CLONE_NEWNET,
	specs.CgroupNamespace:  unix.CLONE_NEWCGROUP,
}

// joinOrder enters the mount namespace last among those that change what
// paths mean; the files are all opened before any setns anyway.
var joinOrder = []specs.LinuxNamespaceType{
	specs.CgroupNamespace, specs.IPCNamespace, specs.UTSNamespace,
	specs.NetworkNamespace, specs.PIDNamespace, specs.MountNamespace,
}

// startInNamespaces runs start on a dedicated OS thread that has first
// entered the namespaces in join, so the child it forks is born inside them
// (setns of a PID namespace only affects children). A multithreaded Go
// process cannot move itself; one locked thread can. The goroutine never
// unlocks, so the runtime discards the thread instead of reusing it with
// foreign namespaces. With nothing to join, start runs on the caller's thread.
func startInNamespaces(join []nsJoin, start func() error) error {
	if len(join) == 0 {
		return start()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- enterAndStart(join, start)
	}()
	return <-errc
}

func enterAndStart(join []nsJoin, start func() error) error {
	byType := map[specs.LinuxNamespaceType]*os.File{}
	defer func() {
		for _, f := range byType {
			f.Close()
		}
	}()
	// Open everything first: after entering the mount namespace, /proc
	// paths would name the target's view.
	for _, j := range join {
		f, err := os.Open(j.Path)
		if err != nil {
			return fmt.Errorf("open %s namespace: %w", j.Type, err)
		}
		byType[j.Type] = f
	}
	// Without a private fs_struct, setns into a mount namespace fails with
	// EINVAL in a multithreaded process.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unshare fs: %w", err)
	}
	for _, t := range joinOrder {
		f, ok := byType[t]
		if !ok {
			continue
		}
		if err := unix.Setns(int(f.Fd()), nsCloneFlag[t]); err != nil {
			return fmt.Errorf("setns %s: %w", t, err)
		}
	}
	return start()
}

// helperJoined are the namespaces an exec's helper enters itself, in this
// order, from descriptors the agent passes (helperNSFd onwards):
//   - cgroup: a process in a cgroup namespace may only fork into cgroups
//     below that namespace's root (clone3 CLONE_INTO_CGROUP fails with
//     ENOENT otherwise), so the agent cannot join it before forking;
//   - mount: the helper must be exec'd from the agent's filesystem (the
//     container may not even mount /proc), then it moves its thread.
var helperJoined = map[specs.LinuxNamespaceType]bool{specs.CgroupNamespace: true, specs.MountNamespace: true}

var helperJoinOrder = []specs.LinuxNamespaceType{specs.CgroupNamespace, specs.MountNamespace}

// helperNamespaces opens the init's namespaces that the exec helper must
// join itself and that differ from the agent's.
func helperNamespaces(initPid int) (types []specs.LinuxNamespaceType, files []*os.File, err error) {
	for _, t := range helperJoinOrder {
		if sameNamespace(initPid, t) {
			continue
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", initPid, nsFiles[t]))
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, nil, fmt.Errorf("open %s namespace of pid %d: %w", t, initPid, err)
		}
		types = append(types, t)
		files = append(files, f)
	}
	return types, files, nil
}

// sameNamespace reports whether pid is in the agent's own namespace of type
// t (so an exec need not join it).
//
// The agent's namespaces are read from the calling thread, not from
// /proc/self: /proc/self/ns shows the main thread's, and the main thread may
// be the one a startInNamespaces goroutine moved into a container's
// namespaces (Go wedges a locked main thread instead of ending it). Every
// thread an unlocked goroutine runs on is still in the agent's namespaces.
func sameNamespace(pid int, t specs.LinuxNamespaceType) bool {
	var a, b unix.Stat_t
	if unix.Stat("/proc/thread-self/ns/"+nsFiles[t], &a) != nil {
		return false
	}
	if unix.Stat(fmt.Sprintf("/proc/%d/ns/%s", pid, nsFiles[t]), &b) != nil {
		return false
	}
	return a.Ino == b.Ino && a.Dev == b.Dev
}

// execJoins lists the namespaces of the init process that an exec must
// enter before it is forked: every one that differs from the agent's, except
// those the helper enters itself (helperJoined).
func execJoins(initPid int) []nsJoin {
	var join []nsJoin
	for _, t := range joinOrder {
		if !helperJoined[t] && !sameNamespace(initPid, t) {
			join = append(join, nsJoin{t, fmt.Sprintf("/proc/%d/ns/%s", initPid, nsFiles[t])})
		}
	}
	return join
}
