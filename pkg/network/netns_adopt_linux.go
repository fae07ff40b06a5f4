package network

import (
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/macvm/macvm/pkg/vm"
)

// Adopting a pooled VM's tap (vm.NIC.Adopt). The pool daemon starts VMs
// ahead with stand-in taps in a network namespace of its own; the shim
// that takes one moves the stand-in into the pod's namespace and points
// the CNI interface's redirect at it, so the frames go straight between
// the CNI interface and qemu's tap, as they do for the shim's own tap
// (no copy, no hotplug: the VM's NIC is the one it was restored with).
// A tun device keeps its queues, offloads and virtio-net header setting
// across the move (TestAdoptTap checks it). The shim's own tap stays,
// wired to nothing, until Close: reclaim points the redirect back at it
// when the pooled VM is given up and the VM that replaces it uses it.

// adoptedTapPrefix names a moved-in tap: macvmp3 carries the interface
// with ifindex 3 (tapPrefix, so setUp never takes it for CNI's).
const adoptedTapPrefix = tapPrefix + "p"

// adopt moves the stand-in tap s into the namespace and makes it carry
// interface i. On error the namespace is as before (the stand-in is left
// where it is, or deleted): the shim's own tap carries i.
func (n *Netns) adopt(i int, s vm.StandIn) error {
	if s.Kind != vm.NICTap || s.Netns == nil || s.Name == "" {
		return fmt.Errorf("network namespace %s: adopt a %s NIC %q: want a tap and its namespace: %w", n.path, s.Kind, s.Name, errdefs.ErrInvalidArgument)
	}
	if i < 0 || i >= len(n.ifs) {
		return fmt.Errorf("network namespace %s: no interface %d: %w", n.path, i, errdefs.ErrInvalidArgument)
	}
	if n.ifs[i].adopted != "" {
		return fmt.Errorf("network namespace %s: %s already carried by %s: %w", n.path, n.ifs[i].name, n.ifs[i].adopted, errdefs.ErrAlreadyExists)
	}
	if typ, err := unix.IoctlRetInt(int(s.Netns.Fd()), unix.NS_GET_NSTYPE); err != nil || typ != unix.CLONE_NEWNET {
		return fmt.Errorf("adopt tap %s: its namespace is no network namespace: %w", s.Name, errdefs.ErrInvalidArgument)
	}
	pod, err := openNS(n.path)
	if err != nil {
		return err
	}
	defer pod.Close()
	var name string
	err = inNetns(pod, func() error {
		l, err := netlink.LinkByName(n.ifs[i].name)
		if err != nil {
			return fmt.Errorf("network namespace %s: %s: %w", n.path, n.ifs[i].name, err)
		}
		name = fmt.Sprintf("%s%d", adoptedTapPrefix, l.Attrs().Index)
		return nil
	})
	if err != nil {
		return err
	}
	// Renamed while still down in its own namespace, then moved: the
	// move fails (nothing changed) if the name is taken in the pod's.
	err = inNetns(s.Netns, func() error {
		l, err := netlink.LinkByName(s.Name)
		if err != nil {
			return fmt.Errorf("stand-in tap %s: %w", s.Name, err)
		}
		if err := netlink.LinkSetName(l, name); err != nil {
			return fmt.Errorf("stand-in tap %s: rename to %s: %w", s.Name, name, err)
		}
		if err := netlink.LinkSetNsFd(l, int(pod.Fd())); err != nil {
			return fmt.Errorf("stand-in tap %s: move into %s: %w", name, n.path, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return inNetns(pod, func() error { return n.rewire(i, name) })
}

// rewire runs inside the namespace: tap (just moved in) gets the CNI
// interface's MTU, goes up, sends its frames out of the interface, and
// the interface's frames go to it instead of the shim's tap.
func (n *Netns) rewire(i int, tap string) (retErr error) {
	t := &n.ifs[i]
	nt, err := netlink.LinkByName(tap)
	if err != nil {
		return fmt.Errorf("network namespace %s: moved tap %s: %w", n.path, tap, err)
	}
	defer func() {
		if retErr != nil {
			// Its qdisc and filter go with it; qemu's fd stays open on a
			// device that no longer exists (the VM is given up).
			netlink.LinkDel(nt)
		}
	}()
	l, err := netlink.LinkByName(t.name)
	if err != nil {
		return fmt.Errorf("network namespace %s: %s: %w", n.path, t.name, err)
	}
	if err := netlink.LinkSetMTU(nt, l.Attrs().MTU); err != nil {
		return fmt.Errorf("network namespace %s: %s: MTU: %w", n.path, tap, err)
	}
	if err := netlink.LinkSetUp(nt); err != nil {
		return fmt.Errorf("network namespace %s: %s: up: %w", n.path, tap, err)
	}
	if err := redirect(nt, l); err != nil {
		return fmt.Errorf("network namespace %s: %w", n.path, err)
	}
	if err := n.redirectFrom(l, nt); err != nil {
		return err
	}
	t.adopted = tap
	return nil
}

// redirectFrom points the CNI interface l's ingress redirect at to; on
// error it points it back at the shim's own tap.
func (n *Netns) redirectFrom(l, to netlink.Link) error {
	if err := netlink.QdiscDel(ingress(l.Attrs().Index)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("network namespace %s: ingress qdisc of %s: %w", n.path, l.Attrs().Name, err)
	}
	err := redirect(l, to)
	if err == nil {
		return nil
	}
	err = fmt.Errorf("network namespace %s: %w", n.path, err)
	for _, t := range n.ifs {
		if t.name != l.Attrs().Name {
			continue
		}
		own, lerr := netlink.LinkByName(t.tap)
		if lerr == nil {
			lerr = redirect(l, own)
		}
		if lerr != nil {
			err = fmt.Errorf("%w; and back to %s: %w", err, t.tap, lerr)
		}
	}
	return err
}

// reclaim undoes adopt for interface i: the moved-in tap is deleted and
// the interface's frames go to the shim's own tap again. No adoption is
// no error.
func (n *Netns) reclaim(i int) error {
	if i < 0 || i >= len(n.ifs) || n.ifs[i].adopted == "" {
		return nil
	}
	pod, err := openNS(n.path)
	if err != nil {
		return err
	}
	defer pod.Close()
	return inNetns(pod, func() error {
		t := &n.ifs[i]
		if l, err := netlink.LinkByName(t.adopted); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				return fmt.Errorf("network namespace %s: delete %s: %w", n.path, t.adopted, err)
			}
		}
		t.adopted = ""
		l, err := netlink.LinkByName(t.name)
		if err != nil {
			return fmt.Errorf("network namespace %s: %s: %w", n.path, t.name, err)
		}
		own, err := netlink.LinkByName(t.tap)
		if err != nil {
			return fmt.Errorf("network namespace %s: %s: %w", n.path, t.tap, err)
		}
		return n.redirectFrom(l, own)
	})
}
