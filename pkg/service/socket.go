package service

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The shim's socket path is keyed on the container ID (or the pod's sandbox
// ID, manager.go), so a container created with the ID of one just deleted
// gets the same path while the old shim may still be tearing its VM down.
// The old shim therefore gives the path up as soon as it knows it ends
// (Service.Shutdown): the next start finds no socket, binds a fresh one and
// starts a shim of its own, instead of handing containerd the dying shim
// (whose exit then fails the new container's Create with "ttrpc: closed").
// Connections already open (containerd's, for the rest of the delete) go on
// through the listener, which unlinking does not close.

// inheritedListenerFD is the descriptor of the socket the start action
// bound and passed to the daemon (manager.go: cmd.ExtraFiles[0]), which
// containerd's shim library serves (shim.serveListener).
const inheritedListenerFD = 3

// shimSocket is the filesystem identity of the shim's listening socket:
// the inode and its change time (an unlinked socket's inode number is
// soon reused; nobody changes a shim socket's attributes after the start
// action's chmod).
type shimSocket struct {
	path     string
	dev, ino uint64
	ctime    unix.Timespec
}

// inheritedSocket names the socket the daemon was started with: the path
// bound to the inherited listener and the inode at that path now (the
// daemon runs before anyone else can bind there: the path is in use). It
// must run before the shim library takes the descriptor over (the task
// service is made before it serves).
func inheritedSocket() (*shimSocket, error) {
	sa, err := unix.Getsockname(inheritedListenerFD)
	if err != nil {
		return nil, fmt.Errorf("inherited shim socket (fd %d): %w", inheritedListenerFD, err)
	}
	ua, ok := sa.(*unix.SockaddrUnix)
	if !ok || ua.Name == "" || ua.Name[0] == '@' || !filepath.IsAbs(ua.Name) {
		return nil, fmt.Errorf("inherited shim socket (fd %d) is not a unix socket with a path: %T", inheritedListenerFD, sa)
	}
	return socketAt(ua.Name)
}

// socketAt records the identity of the socket file at path.
func socketAt(path string) (*shimSocket, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("shim socket %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("shim socket %s is not a socket", path)
	}
	return &shimSocket{path: path, dev: uint64(st.Dev), ino: uint64(st.Ino), ctime: st.Ctim}, nil
}

// release unlinks the socket path if it is still this shim's socket (a
// start action that wrongly judged this shim dead may have replaced it),
// and keeps containerd's shim library from unlinking the path on its way
// out, when it may be another shim's.
func (s *shimSocket) release() error {
	disownLibrarySocketCleanup()
	cur, err := socketAt(s.path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if cur.dev != s.dev || cur.ino != s.ino || cur.ctime != s.ctime {
		return nil
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove shim socket: %w", err)
	}
	return nil
}

// releasedSocketFlag is a socket path that can never exist (/dev/null is
// not a directory).
var releasedSocketFlag = filepath.Join(os.DevNull, "macvm-shim-socket-released")

// disownLibrarySocketCleanup points the shim library's exit cleanup away
// from the socket path. When its serve loop ends (after the shutdown
// callbacks, i.e. after the VM's teardown) the library removes the socket
// named by its -socket flag or, without one, the path it computes from
// the default state dir and the -id flag: the same path a new container
// with this ID (or a new pod with this sandbox ID) has bound by then. The
// flag is read at startup (to pick the listener) and at that cleanup only.
// Outside a shim process (tests) the flag is not defined, and nothing is
// changed.
func disownLibrarySocketCleanup() {
	if flag.Lookup("socket") == nil {
		return
	}
	_ = flag.Set("socket", releasedSocketFlag)
}
