package vm

import (
	"fmt"
	"os"

	"github.com/containerd/errdefs"
)

// Stand-ins for a Virtualization.framework template build. The framework
// restores a saved VM only into a configuration that matches the saved
// one, so the template VM gets devices of the same kinds, order and flags
// as the container VMs that will be its clones, attached to throw-away
// host ends: nothing of a container may be in a template, and a template
// builder's job carries no file descriptors anyway (NIC.File is not
// serialised). Plain Go over golang.org/x/sys/unix, so it is tested on
// Linux too.

// StandInDiskBytes is the size of a stand-in disk image in a
// Virtualization.framework template (QEMU's stand-ins are empty files).
// Whether the framework accepts a zero-byte disk image is not documented,
// and could not be checked here (no Mac), so the stand-in is the smallest
// image that is whole 512-byte sectors and whole 4 KiB blocks alike. It is
// too small to hold the container's ext4 or erofs image of any real layer
// (their superblocks alone end past 1 KiB, and mkfs.erofs writes 4 KiB
// blocks), and the agent re-probes a disk whose capacity is at most this
// (guest-agent's reprobe), so a clone sees the container's image, not the
// stand-in it was saved with.
const StandInDiskBytes = 4096

// vzStandInNICs returns NICs of the same kinds, in the same order, as
// nics for a template build under Virtualization.framework: each the
// guest end of a fresh connected datagram socketpair (the framework's
// VZFileHandleNetworkDeviceAttachment, as for the NAT stack's NIC) with
// TemplateMAC(i). Nothing answers on the other end: the template's guest
// never brings its NICs up (the agent configures them for a container,
// after the restore). release closes both ends of every pair; call it once
// the template VM has stopped. A tap cannot stand in here: the framework
// attaches no taps (planVZ refuses them).
func vzStandInNICs(nics []NIC) (out []NIC, release func(), err error) {
	var files []*os.File
	release = func() {
		for _, f := range files {
			f.Close()
		}
	}
	out = make([]NIC, len(nics))
	for i, n := range nics {
		if n.Kind != NICDatagram {
			release()
			return nil, nil, fmt.Errorf("stand-in for NIC %d: %s NICs need QEMU on Linux: %w", i, n.Kind, errdefs.ErrNotImplemented)
		}
		ours, theirs, err := NewDatagramPair("standin-stack", "standin-nic")
		if err != nil {
			release()
			return nil, nil, fmt.Errorf("stand-in for NIC %d: %w", i, err)
		}
		files = append(files, ours, theirs)
		out[i] = NIC{Kind: NICDatagram, File: theirs, MAC: TemplateMAC(i)}
	}
	return out, release, nil
}

// vzStandInDisks gives each of a template build's disks (build's empty
// files) StandInDiskBytes, sparse: the framework then attaches them as it
// attaches a container's images.
func vzStandInDisks(disks []Disk) error {
	for i, d := range disks {
		if err := os.Truncate(d.Path, StandInDiskBytes); err != nil {
			return fmt.Errorf("stand-in for disk %d: %w", i, err)
		}
	}
	return nil
}

// vzCloneNICs is a clone's NICs: the container's own host ends, each with
// its template's MAC (TemplateMAC), since the framework restores only into
// the saved configuration. The agent then finds the NIC by that MAC and
// gives it the container's (pkg/service's forClone). nics is not changed.
func vzCloneNICs(nics []NIC) []NIC {
	out := make([]NIC, len(nics))
	for i, n := range nics {
		n.MAC = TemplateMAC(i)
		out[i] = n
	}
	return out
}
