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
	s, err := newStandIns(nics)
	if err != nil {
		return nil, nil, err
	}
	return s.nics, s.close, nil
}

// standIns are the stand-in backends of one VM's NICs (standInNICs); the
// pool daemon keeps them to hand each one over (handOver) with the VM.
type standIns struct {
	// nics are the VM's NICs (File: what qemu gets).
	nics []NIC
	// ns is the private namespace of the taps (nil without taps); names
	// are the taps' names in it, by NIC index ("" for a datagram NIC).
	ns    *os.File
	names []string
	// closers are every file opened here, ns and the stacks' ends
	// ("ours", never qemu's) included.
	closers []*os.File
}

func (s *standIns) close() {
	for _, f := range s.closers {
		f.Close()
	}
}

// dropQEMUEnds closes the files qemu has its own copies of once it
// started: a tap then lives as long as qemu holds it. The namespace and
// the datagram NICs' other ends stay until close.
func (s *standIns) dropQEMUEnds() {
	for _, n := range s.nics {
		if n.Kind == NICTap {
			n.File.Close()
		}
	}
}

// handOver is what a shim adopting the VM gets per NIC: the taps'
// namespace, or a copy of qemu's end of a socket pair (see StandIn).
func (s *standIns) handOver() ([]poolNIC, []*os.File) {
	meta := make([]poolNIC, len(s.nics))
	files := make([]*os.File, len(s.nics))
	for i, n := range s.nics {
		meta[i] = poolNIC{Kind: n.Kind, Name: s.names[i]}
		if n.Kind == NICTap {
			files[i] = s.ns
		} else {
			files[i] = n.File
		}
	}
	return meta, files
}

func newStandIns(nics []NIC) (s *standIns, err error) {
	s = &standIns{names: make([]string, len(nics))}
	defer func() {
		if err != nil {
			s.close()
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
			return nil, err
		}
		// The namespace's fd keeps it (and the taps) alive after the
		// thread that made it is gone.
		s.ns = ns
		s.closers = append(s.closers, ns)
		s.closers = append(s.closers, files...)
		tapFiles = files
	}
	s.nics = make([]NIC, len(nics))
	tapIndex := 0
	for i, n := range nics {
		switch n.Kind {
		case NICTap:
			s.nics[i] = NIC{Kind: NICTap, File: tapFiles[0], MAC: TemplateMAC(i)}
			s.names[i] = standInTapName(tapIndex)
			tapFiles = tapFiles[1:]
			tapIndex++
		case NICDatagram:
			// As the user-space network makes its pair: a pooled VM's
			// socket carries a container's traffic once adopted.
			ours, theirs, err := NewDatagramPair("standin-stack", "standin-nic")
			if err != nil {
				return nil, fmt.Errorf("stand-in for NIC %d: %w", i, err)
			}
			s.closers = append(s.closers, ours, theirs)
			s.nics[i] = NIC{Kind: NICDatagram, File: theirs, MAC: TemplateMAC(i)}
		default:
			return nil, fmt.Errorf("stand-in for NIC %d: kind %s: %w", i, n.Kind, errdefs.ErrInvalidArgument)
		}
	}
	return s, nil
}

// standInTapName is the name of the i-th stand-in tap in its namespace.
func standInTapName(i int) string { return fmt.Sprintf("tmpl%d", i) }

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
			f, err := tap.Open(standInTapName(i))
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
