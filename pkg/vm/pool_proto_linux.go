package vm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// The pool protocol: one JSON request line from the shim, one JSON reply
// line from the daemon. A reply handing over a VM carries, with
// SCM_RIGHTS on the same message, poolFDCount descriptors in this order:
// the QMP socket, the agent socket and a pidfd of the qemu process, then
// one per NIC (poolReply.NICs: the stand-in taps' namespace, or a copy of
// qemu's end of a datagram NIC's socket pair). The
// connection then stays open as the VM's lease: when the shim closes it
// (its VM is gone, or the shim died) the daemon kills the qemu if it still
// runs, reaps it and removes the VM's directory.

// Pool requests.
const (
	poolOpTake   = "take"
	poolOpStatus = "status"
)

// poolFDCount is how many descriptors a hand-over carries before the
// NICs'.
const poolFDCount = 3

// maxPoolNICs bounds the NICs of a pooled VM (one descriptor each).
const maxPoolNICs = 16

// poolNIC describes a pooled VM's NIC in a hand-over: its kind and, for a
// tap, its name in the namespace handed over with it.
type poolNIC struct {
	Kind NICKind `json:"kind"`
	Name string  `json:"name,omitempty"`
}

// maxPoolMessage bounds a request or reply line.
const maxPoolMessage = 1 << 20

// poolRequest is what a shim asks the daemon.
type poolRequest struct {
	Op string `json:"op"`
	// Config is the VM the shim wants (take): its template key picks the
	// pool; the daemon starts the pool's VMs from it with its own state
	// and share directories.
	Config Config `json:"config,omitzero"`
	// Size is how many VMs of this key to keep ready (the shim's
	// pool_size); 0 empties the key's pool.
	Size int `json:"size"`
	// IdleMs is how long the daemon keeps a key's pool (and itself)
	// without takes.
	IdleMs int64 `json:"idle_ms"`
}

// poolReply answers a request. Error is set when no VM was handed over;
// Empty says the pool had none ready (not a failure of the daemon).
type poolReply struct {
	Error string `json:"error,omitempty"`
	Empty bool   `json:"empty,omitempty"`

	Key string `json:"key,omitempty"`
	Pid int    `json:"pid,omitempty"`
	// Dir is the pooled VM's state directory (console and qemu log);
	// Shares are its shares' host directories, in Config.Shares order.
	Dir    string   `json:"dir,omitempty"`
	Shares []string `json:"shares,omitempty"`
	// ReadyMs is how long the VM had waited in the pool.
	ReadyMs int64 `json:"ready_ms,omitempty"`
	// NICs are the VM's stand-in NICs, in Config.NICs order; their
	// descriptors follow the first poolFDCount.
	NICs []poolNIC `json:"nics,omitempty"`

	// Status (status requests): per key, VMs ready and handed out.
	Status map[string]PoolKeyStatus `json:"status,omitempty"`
}

// PoolKeyStatus is the daemon's count of one template key's VMs.
type PoolKeyStatus struct {
	Ready  int `json:"ready"`
	Leased int `json:"leased"`
	Size   int `json:"size"`
}

// writePoolMessage sends v as one line, with files' descriptors attached
// (SCM_RIGHTS) when there are any.
func writePoolMessage(c *net.UnixConn, v any, files ...*os.File) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("pool: send: %w", err)
	}
	if oobn != len(oob) {
		return fmt.Errorf("pool: sent %d of %d bytes of descriptors: %w", oobn, len(oob), errdefs.ErrUnavailable)
	}
	if n < len(b) {
		// Rare on a unix stream socket; the descriptors went with the
		// first part.
		if _, err := c.Write(b[n:]); err != nil {
			return fmt.Errorf("pool: send: %w", err)
		}
	}
	return nil
}

// readPoolMessage reads one line into v and returns the descriptors that
// came with it as files (the caller owns them). A message with more
// descriptors than want, or a garbled one, is an error and every
// descriptor that came is closed.
func readPoolMessage(c *net.UnixConn, v any, want int, deadline time.Time) (files []*os.File, retErr error) {
	if !deadline.IsZero() {
		_ = c.SetReadDeadline(deadline)
		defer c.SetReadDeadline(time.Time{})
	}
	defer func() {
		if retErr != nil {
			for _, f := range files {
				f.Close()
			}
			files = nil
		}
	}()
	var line []byte
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*(max(want, poolFDCount)+1)))
	for {
		n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			fs, perr := parseRights(oob[:oobn])
			files = append(files, fs...)
			if perr != nil {
				return files, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return files, fmt.Errorf("pool: descriptors truncated: %w", errdefs.ErrDataLoss)
		}
		line = append(line, buf[:n]...)
		if i := bytes.IndexByte(line, '\n'); i >= 0 {
			if i != len(line)-1 {
				return files, fmt.Errorf("pool: data after the message: %w", errdefs.ErrInvalidArgument)
			}
			line = line[:i]
			break
		}
		if err != nil {
			return files, fmt.Errorf("pool: receive: %w", err)
		}
		if n == 0 {
			return files, fmt.Errorf("pool: connection closed mid-message: %w", errdefs.ErrUnavailable)
		}
		if len(line) > maxPoolMessage {
			return files, fmt.Errorf("pool: message longer than %d bytes: %w", maxPoolMessage, errdefs.ErrInvalidArgument)
		}
	}
	if len(files) > want {
		return files, fmt.Errorf("pool: %d descriptors, want at most %d: %w", len(files), want, errdefs.ErrInvalidArgument)
	}
	if err := json.Unmarshal(line, v); err != nil {
		return files, fmt.Errorf("pool: message: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return files, nil
}

// parseRights turns SCM_RIGHTS control messages into files.
func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("pool: control message: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue // not SCM_RIGHTS
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), "pool-fd"))
		}
	}
	return files, nil
}
