// Package vm starts, stops and pauses the lightweight Linux VM that hosts a
// container, and hands out the VM's agent channel. It knows nothing about
// containers or containerd: a VM is a kernel, an initramfs, some shared
// directories and disks, and one byte channel to the guest agent.
//
// Backends live in files with build suffixes (QEMU on Linux, Apple's
// Virtualization.framework on macOS) behind the Machine interface.
package vm

import (
	"context"
	"net"
	"os"
	"strconv"
	"time"
)

// Share is a host directory exported to the guest under a tag (9p under
// QEMU, virtiofs under Virtualization.framework).
type Share struct {
	// Tag is how the guest names the share when mounting it; shorter than
	// 32 bytes so every backend accepts it.
	Tag      string
	HostPath string
	ReadOnly bool
}

// Disk is a raw disk image attached as a virtio block device; disks appear
// in the guest as /dev/vda, /dev/vdb, ... in the order given, each with the
// serial DiskSerial(index).
type Disk struct {
	Path     string
	ReadOnly bool
}

// NICKind says what the host end of a NIC is.
type NICKind int

const (
	// NICDatagram is a connected SOCK_DGRAM unix socket carrying one bare
	// Ethernet frame per datagram: the user-space network stack's end.
	// Both backends take it (QEMU -netdev dgram, Virtualization.framework
	// VZFileHandleNetworkDeviceAttachment), so they share one stack.
	NICDatagram NICKind = iota
	// NICTap is an open tap device (IFF_TAP|IFF_NO_PI) in the pod's network
	// namespace; QEMU on Linux only.
	NICTap
)

func (k NICKind) String() string {
	switch k {
	case NICDatagram:
		return "datagram"
	case NICTap:
		return "tap"
	}
	return "unknown"
}

// NIC is one virtio-net device. The guest finds it by MAC (or by its
// position among the VM's NICs, which follows the order in Config.NICs) and
// the agent gives it its final name, MAC and addresses.
type NIC struct {
	Kind NICKind
	// File is the host end (see NICKind). The backend hands it to the
	// hypervisor while starting; the caller keeps ownership and closes it
	// after Start returns (QEMU has its own copy by then) or after the VM
	// has stopped (Virtualization.framework uses it in-process). It is never
	// serialised: a template builder's job has none (it makes stand-ins).
	File *os.File `json:"-"`
	// MAC is the device's MAC; empty lets the backend pick none (QEMU's
	// default) or a random one.
	MAC net.HardwareAddr
	// Adopt, when set, lets the VM be one the pool daemon started ahead
	// with a stand-in of this NIC's kind (see StandIn): it makes the
	// stand-in carry this NIC's traffic instead of File. It must leave
	// File working when it fails (the caller then starts a template
	// clone with File). nil: VMs with this NIC are never pooled.
	Adopt func(StandIn) error `json:"-"`
	// Reclaim undoes a successful Adopt once the pooled VM is given up
	// (it failed after the adoption): File carries the NIC's traffic
	// again, for the template clone or cold boot that follows. Set with
	// Adopt; a no-op when nothing was adopted.
	Reclaim func() error `json:"-"`
}

// StandIn is a pooled VM's NIC backend as the pool daemon hands it over,
// for NIC.Adopt. For a tap, Netns is a network namespace the daemon made
// and Name the tap (down, qemu's) in it: the adopter moves it into the
// pod's namespace and wires it. For a datagram NIC, File is a copy of
// qemu's end of the stand-in socket pair: the adopter connects it to its
// network stack's end. The caller closes the files after Adopt returns.
type StandIn struct {
	Kind  NICKind
	Netns *os.File
	Name  string
	File  *os.File
}

// DiskSerial is the virtio-blk serial of the disk at index in Config.Disks
// (/sys/block/vdX/serial in the guest). Every backend sets it, so the guest
// finds a disk by its identity rather than by enumeration order.
func DiskSerial(index int) string { return "disk" + strconv.Itoa(index) }

// Config describes one VM.
type Config struct {
	// ID names the VM in logs; it is not interpreted.
	ID string
	// StateDir holds the VM's sockets and console log; the caller creates
	// it and removes it after the VM has exited.
	StateDir string
	// Kernel is the kernel image (an uncompressed vmlinux boots fastest
	// under QEMU through PVH); Initrd is the initramfs holding the agent.
	Kernel string
	Initrd string
	// KernelArgs are appended to the backend's own command line.
	KernelArgs []string
	CPUs       int
	MemoryMiB  int
	Shares     []Share
	Disks      []Disk
	// NICs are the VM's virtio-net devices, in order; none means the
	// guest has loopback only.
	NICs []NIC
	// Hypervisor overrides the backend's default binary (QEMU only).
	Hypervisor string
	// Templates enables warm start: the VM starts as a clone of a saved
	// template of the same boot configuration when the cache has one
	// (see TemplateCache). nil always boots cold.
	Templates *TemplateCache `json:"-"`
}

// Machine is one running (or about to run) VM.
type Machine interface {
	// Start launches the VM and returns once the hypervisor runs it; the
	// guest may still be booting. Call AgentConn to reach the agent.
	Start(ctx context.Context) error
	// AgentConn returns the host end of the agent channel. It is the same
	// connection for the VM's life; the caller owns framing on top of it.
	AgentConn(ctx context.Context) (net.Conn, error)
	// Pause and Resume freeze and thaw the whole VM.
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	// Stop waits for the VM to exit by itself until ctx ends (the caller
	// asks the agent to power off first), then kills it. It returns once
	// the hypervisor process is gone and is safe to call more than once.
	Stop(ctx context.Context) error
	// Done is closed when the VM has exited, for whatever reason.
	Done() <-chan struct{}
	// Err tells why the VM exited, once Done is closed (nil for a clean
	// power-off).
	Err() error
	// ConsoleTail returns up to the last n bytes the guest wrote to its
	// console, for error messages.
	ConsoleTail(n int) string
	// Pid is the hypervisor process (for accounting), or 0 in-process.
	Pid() int
	// BootStarted is when the hypervisor was started.
	BootStarted() time.Time
}
