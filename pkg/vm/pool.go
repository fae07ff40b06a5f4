package vm

import (
	"context"
	"net"
	"path/filepath"
	"time"
)

// PoolClient asks the pool daemon (pool_daemon_linux.go) for a VM of the
// wanted configuration that it started ahead: a template clone already
// restored and paused, whose QEMU only needs a `cont`. The daemon outlives
// shims (one shim per pod would otherwise only pool for itself); a shim
// that finds none starts one through Spawn. Any failure to get a pooled VM
// means the caller starts a template clone instead. QEMU only: the vz
// backend treats pool as template.
type PoolClient struct {
	// Dir is the daemon's directory (PoolSocket, PoolPidFile, the pooled
	// VMs' directories), normally <template_dir>/pool.
	Dir string
	// Size is how many VMs of a template key the daemon keeps ready; 0
	// asks a running daemon to drop the key's pool (and never starts one).
	Size int
	// IdleTimeout is how long the daemon keeps a key's pool, and itself,
	// without a request.
	IdleTimeout time.Duration
	// Spawn starts a daemon when none answers; it must not block (the
	// daemon's first VMs serve later requests). nil starts none.
	Spawn func(cfg Config)
	// Timeout bounds one hand-over (default DefaultPoolTimeout).
	Timeout time.Duration
}

// DefaultPoolTimeout bounds a hand-over: the daemon answers at once from
// VMs it has ready, so only a wedged daemon takes long.
const DefaultPoolTimeout = 10 * time.Second

// DefaultPoolIdleTimeout is how long a pool lives without requests.
const DefaultPoolIdleTimeout = 10 * time.Minute

// PoolSocket is the daemon's socket in dir; PoolPidFile holds its pid
// (for tests and `make` targets that stop it); PoolLockFile makes it a
// singleton per directory.
func PoolSocket(dir string) string   { return filepath.Join(dir, "pool.sock") }
func PoolPidFile(dir string) string  { return filepath.Join(dir, "pool.pid") }
func PoolLockFile(dir string) string { return filepath.Join(dir, "pool.lock") }

// ShareDirer is implemented by machines whose shares are served from
// other host directories than their Config named: a pooled VM had to be
// started (and its 9p shares opened) before anyone asked for it, so it
// serves directories of its own, below which the caller mounts what the
// guest should see.
type ShareDirer interface {
	ShareDirs() []string
}

// ShareDirsOf is m's shares' host directories, or nil when they are the
// ones its Config named.
func ShareDirsOf(m Machine) []string {
	if s, ok := m.(ShareDirer); ok {
		return s.ShareDirs()
	}
	return nil
}

// PoolDirer is implemented by machines whose hypervisor the pool daemon
// started: it runs in a directory of the pool's (its command line names
// that one, not the Config's StateDir), and it is not the caller's child.
type PoolDirer interface {
	PoolDir() string
}

// PoolDirOf is the pool directory m's hypervisor runs in, or "" when m
// was not handed over by the pool daemon.
func PoolDirOf(m Machine) string {
	if p, ok := m.(PoolDirer); ok {
		return p.PoolDir()
	}
	return ""
}

// PoolJob is what a shim hands the daemon it starts: its VM's
// configuration and pool settings, so the pool fills at once.
type PoolJob struct {
	Config      Config        `json:"config"`
	Size        int           `json:"size"`
	IdleTimeout time.Duration `json:"idle_timeout"`
}

// PoolWarmFunc warms a pooled VM up after its restore (see
// PoolDaemon.Warm): conn is a connection to its agent, shareTags the tags
// of its shares; release ends the session (after the VM is paused again).
type PoolWarmFunc func(ctx context.Context, conn net.Conn, shareTags []string) (release func(), err error)
