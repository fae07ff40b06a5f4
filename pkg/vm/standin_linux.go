package vm

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/internal/tap"
)

// standInNICs returns NICs of the same kinds, in the same order, as nics,
// for a template build: a template must not hold a container's backend,
// yet a clone's backend must match what the template's guest negotiated.
// A tap and a datagram socket give different virtio-net features (QEMU
// offers checksum and segmentation offloads only over a tap with
// virtio-net headers), and those features are in the saved state, so a
// tap stands in for a tap (opened like the pod network's, in a private
// network namespace of this process) and a socketpair for a datagram
// socket. Each stand-in has TemplateMAC. release closes them all; the
// private namespace and its taps go with the last fd.
func standInNICs(nics []NIC) (out []NIC, release func(), err error) {
	var closers []*os.File
	release = func() {
		for _, f := range closers {
			f.Close()
		}
	}
	defer func() {
		if err != nil {
			release()
		}
	}()
	taps := 0
	for _, n := range nics {
		if n.Kind == NICTap {
			taps++
		}
	}
	var tapFiles []*os.File
	if taps > 0 {
		ns, files, err := privateTaps(taps)
		if err != nil {
			return nil, nil, err
		}
		// The namespace's fd keeps it (and the taps) alive after the
		// thread that made it is gone.
		closers = append(closers, ns)
		closers = append(closers, files...)
		tapFiles = files
	}
	out = make([]NIC, len(nics))
	for i, n := range nics {
		switch n.Kind {
		case NICTap:
			out[i] = NIC{Kind: NICTap, File: tapFiles[0], MAC: TemplateMAC(i)}
			tapFiles = tapFiles[1:]
		case NICDatagram:
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return nil, nil, fmt.Errorf("stand-in for NIC %d: socketpair: %w", i, err)
			}
			ours, theirs := os.NewFile(uintptr(fds[0]), "standin-stack"), os.NewFile(uintptr(fds[1]), "standin-nic")
			closers = append(closers, ours, theirs)
			out[i] = NIC{Kind: NICDatagram, File: theirs, MAC: TemplateMAC(i)}
		default:
			return nil, nil, fmt.Errorf("stand-in for NIC %d: kind %s: %w", i, n.Kind, errdefs.ErrInvalidArgument)
		}
	}
	return out, release, nil
}

// privateTaps creates a network namespace of its own (on a thread that is
// never given back, so Go discards it) holding n taps, and returns an fd
// of the namespace and the taps' queues. The taps stay down: the template's
// guest never brings its NICs up (the agent configures them only for a
// container, after the restore).
func privateTaps(n int) (*os.File, []*os.File, error) {
	type result struct {
		ns    *os.File
		files []*os.File
		err   error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread leaves our namespace
		var r result
		defer func() {
			if r.err != nil {
				for _, f := range r.files {
					f.Close()
				}
				if r.ns != nil {
					r.ns.Close()
				}
				r.files, r.ns = nil, nil
			}
			ch <- r
		}()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			r.err = fmt.Errorf("stand-in taps: new network namespace: %w", err)
			return
		}
		r.ns, r.err = os.Open("/proc/thread-self/ns/net")
		if r.err != nil {
			return
		}
		for i := 0; i < n; i++ {
			f, err := tap.Open(fmt.Sprintf("tmpl%d", i))
			if err != nil {
				r.err = fmt.Errorf("stand-in tap: %w", err)
				return
			}
			r.files = append(r.files, f)
		}
	}()
	r := <-ch
	if r.err != nil && errors.Is(r.err, unix.EPERM) {
		r.err = fmt.Errorf("%w: %w", r.err, errdefs.ErrPermissionDenied)
	}
	return r.ns, r.files, r.err
}
