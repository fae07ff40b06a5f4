package vm

import (
	"errors"
	"fmt"
	"net"
	"os"

	vz "github.com/Code-Hex/vz/v3"
	"github.com/containerd/errdefs"
)

// NewVZ checks cfg and returns a Virtualization.framework machine ready to
// Start. The framework objects are created in Start, so a Config that the
// framework rejects (too little memory, a missing entitlement) fails there,
// with the framework's own message.
//
// The calling process must be signed with the
// com.apple.security.virtualization entitlement (see the Makefile), and the
// kernel must be one Virtualization.framework boots: an uncompressed arm64
// Image, or an x86_64 bzImage (see cmd/macvm-kernel).
func NewVZ(cfg Config) (Machine, error) {
	for _, p := range []string{cfg.Kernel, cfg.Initrd} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("vm %s: boot file: %w: %w", cfg.ID, errdefs.ErrNotFound, err)
		}
	}
	if cfg.Templates != nil && vzSaveRestoreAvailable() {
		// Starts from a saved template when there is one (template_vz.go).
		return newWarmVZ(cfg, createVZ)
	}
	m, err := newVZMachine(cfg, createVZ)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// vzVM adapts a *vz.VirtualMachine to vzInstance. It holds every framework
// object of the VM: vz releases Objective-C objects from Go
// finalizers, so anything not referenced from here could be released (and
// a file closed) while the VM still uses it. The machine keeps the vzVM
// for the VM's life.
type vzVM struct {
	vm     *vz.VirtualMachine
	config *vz.VirtualMachineConfiguration
	// keep holds the device configurations and attachments.
	keep []any
	// socket is the VM's vsock device, looked up once: each
	// SocketDevices call wraps the device in a new Go object.
	socket *vz.VirtioSocketDevice
	states <-chan vz.VirtualMachineState
	mapped chan vzState
}

// createVZ builds the framework configuration from plan, validates it and
// creates the VM (not started).
func createVZ(plan vzPlan) (vzInstance, error) {
	v := &vzVM{}
	fail := func(what string, err error) (vzInstance, error) {
		if errors.Is(err, vz.ErrUnsupportedOSVersion) || errors.Is(err, vz.ErrBuildTargetOSVersion) {
			return nil, fmt.Errorf("%s: %w: %w", what, errdefs.ErrNotImplemented, err)
		}
		return nil, fmt.Errorf("%s: %w: %w", what, errdefs.ErrInvalidArgument, err)
	}

	opts := []vz.LinuxBootLoaderOption{vz.WithCommandLine(plan.Cmdline)}
	if plan.Initrd != "" {
		opts = append(opts, vz.WithInitrd(plan.Initrd))
	}
	boot, err := vz.NewLinuxBootLoader(plan.Kernel, opts...)
	if err != nil {
		return fail("boot loader", err)
	}
	lo, hi := vz.VirtualMachineConfigurationMinimumAllowedMemorySize(), vz.VirtualMachineConfigurationMaximumAllowedMemorySize()
	if plan.MemoryBytes < lo || plan.MemoryBytes > hi {
		return nil, fmt.Errorf("memory %d MiB outside the framework's %d-%d MiB: %w",
			plan.MemoryBytes>>20, lo>>20, hi>>20, errdefs.ErrInvalidArgument)
	}
	if most := vz.VirtualMachineConfigurationMaximumAllowedCPUCount(); plan.CPUs > most {
		return nil, fmt.Errorf("%d CPUs, the framework allows %d: %w", plan.CPUs, most, errdefs.ErrInvalidArgument)
	}
	cfg, err := vz.NewVirtualMachineConfiguration(boot, plan.CPUs, plan.MemoryBytes)
	if err != nil {
		return fail("configuration", err)
	}
	v.config = cfg
	v.keep = append(v.keep, boot)

	// Console: hvc0 into a file, so its tail survives the VM.
	// Truncate a previous log; the attachment opens the file itself.
	f, err := os.Create(plan.ConsolePath)
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	f.Close()
	serialAttach, err := vz.NewFileSerialPortAttachment(plan.ConsolePath, true)
	if err != nil {
		return fail("console", err)
	}
	serial, err := vz.NewVirtioConsoleDeviceSerialPortConfiguration(serialAttach)
	if err != nil {
		return fail("console", err)
	}
	cfg.SetSerialPortsVirtualMachineConfiguration([]*vz.VirtioConsoleDeviceSerialPortConfiguration{serial})
	v.keep = append(v.keep, serialAttach, serial)

	// The agent channel: one vsock device per VM.
	sock, err := vz.NewVirtioSocketDeviceConfiguration()
	if err != nil {
		return fail("vsock", err)
	}
	cfg.SetSocketDevicesVirtualMachineConfiguration([]vz.SocketDeviceConfiguration{sock})
	v.keep = append(v.keep, sock)

	// Entropy, so the guest's pool fills at once and getrandom never blocks.
	entropy, err := vz.NewVirtioEntropyDeviceConfiguration()
	if err != nil {
		return fail("entropy", err)
	}
	cfg.SetEntropyDevicesVirtualMachineConfiguration([]*vz.VirtioEntropyDeviceConfiguration{entropy})
	v.keep = append(v.keep, entropy)

	// NICs: each a file handle attachment over the connected datagram
	// socket of the shim's user-space stack; one Ethernet frame per
	// datagram, as QEMU's dgram netdev, so both backends share the stack.
	var nics []*vz.VirtioNetworkDeviceConfiguration
	for _, n := range plan.NICs {
		attach, err := vz.NewFileHandleNetworkDeviceAttachment(n.File)
		if err != nil {
			return fail("network", err)
		}
		nic, err := vz.NewVirtioNetworkDeviceConfiguration(attach)
		if err != nil {
			return fail("network", err)
		}
		var mac *vz.MACAddress
		if len(n.MAC) != 0 {
			mac, err = vz.NewMACAddress(n.MAC)
		} else {
			mac, err = vz.NewRandomLocallyAdministeredMACAddress()
		}
		if err != nil {
			return fail("network", err)
		}
		nic.SetMACAddress(mac)
		nics = append(nics, nic)
		v.keep = append(v.keep, attach, nic, mac)
	}
	if len(nics) > 0 {
		cfg.SetNetworkDevicesVirtualMachineConfiguration(nics)
	}

	// virtiofs: one device per share, tag = Share.Tag. Shares are fixed
	// once the VM is created.
	var fsDevs []vz.DirectorySharingDeviceConfiguration
	for _, s := range plan.Shares {
		dir, err := vz.NewSharedDirectory(s.HostPath, s.ReadOnly)
		if err != nil {
			return fail("share "+s.Tag, err)
		}
		share, err := vz.NewSingleDirectoryShare(dir)
		if err != nil {
			return fail("share "+s.Tag, err)
		}
		dev, err := vz.NewVirtioFileSystemDeviceConfiguration(s.Tag)
		if err != nil {
			return fail("share "+s.Tag, err)
		}
		dev.SetDirectoryShare(share)
		fsDevs = append(fsDevs, dev)
		v.keep = append(v.keep, dir, share, dev)
	}
	if len(fsDevs) > 0 {
		cfg.SetDirectorySharingDevicesVirtualMachineConfiguration(fsDevs)
	}

	// Disks: raw images, host-cached with fsync on flush (the guest's
	// fsync then reaches the disk), in order: /dev/vda, /dev/vdb, ...
	var blkDevs []vz.StorageDeviceConfiguration
	for _, d := range plan.Disks {
		attach, err := vz.NewDiskImageStorageDeviceAttachmentWithCacheAndSync(d.Path, d.ReadOnly,
			vz.DiskImageCachingModeCached, vz.DiskImageSynchronizationModeFsync)
		if err != nil {
			return fail("disk "+d.Path, err)
		}
		blk, err := vz.NewVirtioBlockDeviceConfiguration(attach)
		if err != nil {
			return fail("disk "+d.Path, err)
		}
		// The serial the guest matches disks by (macOS 12.3+; older
		// systems still get the disks, in order).
		if err := blk.SetBlockDeviceIdentifier(d.ID); err != nil && !errors.Is(err, vz.ErrUnsupportedOSVersion) {
			return fail("disk "+d.Path, err)
		}
		blkDevs = append(blkDevs, blk)
		v.keep = append(v.keep, attach, blk)
	}
	if len(blkDevs) > 0 {
		cfg.SetStorageDevicesVirtualMachineConfiguration(blkDevs)
	}

	// Validate is where a missing entitlement or an out-of-range device
	// shows up, with the framework's explanation.
	if ok, err := cfg.Validate(); !ok || err != nil {
		if err == nil {
			err = errors.New("configuration rejected")
		}
		return fail("validate (is the binary signed with com.apple.security.virtualization?)", err)
	}
	machine, err := vz.NewVirtualMachine(cfg)
	if err != nil {
		return fail("create", err)
	}
	v.vm = machine
	socks := machine.SocketDevices()
	if len(socks) != 1 {
		return nil, fmt.Errorf("vm has %d vsock devices, want 1: %w", len(socks), errdefs.ErrInternal)
	}
	v.socket = socks[0]
	v.states = machine.StateChangedNotify()
	v.mapped = make(chan vzState)
	go v.mapStates()
	return v, nil
}

// mapStates forwards the framework's state changes as vzStates. The
// framework's channel never closes, so this goroutine lives for the rest of
// the process (the shim's process ends with its VM), blocked on a send once
// the machine has seen the final state; its reference to v is part of what
// keeps the VM's objects alive while the VM runs.
func (v *vzVM) mapStates() {
	for st := range v.states {
		v.mapped <- mapVZState(st)
	}
}

func mapVZState(st vz.VirtualMachineState) vzState {
	switch st {
	case vz.VirtualMachineStateStopped:
		return vzStopped
	case vz.VirtualMachineStateRunning:
		return vzRunning
	case vz.VirtualMachineStatePaused:
		return vzPaused
	case vz.VirtualMachineStateError:
		return vzError
	case vz.VirtualMachineStateStarting:
		return vzStarting
	case vz.VirtualMachineStatePausing:
		return vzPausing
	case vz.VirtualMachineStateResuming:
		return vzResuming
	case vz.VirtualMachineStateStopping:
		return vzStopping
	case vz.VirtualMachineStateSaving:
		return vzSaving
	case vz.VirtualMachineStateRestoring:
		return vzRestoring
	}
	return vzState(st)
}

func (v *vzVM) Start() error                 { return v.vm.Start() }
func (v *vzVM) Pause() error                 { return v.vm.Pause() }
func (v *vzVM) Resume() error                { return v.vm.Resume() }
func (v *vzVM) RequestStop() (bool, error)   { return v.vm.RequestStop() }
func (v *vzVM) StateChanges() <-chan vzState { return v.mapped }

// Stop pulls the plug; a VM that already stopped is not an error.
func (v *vzVM) Stop() error {
	if !v.vm.CanStop() {
		if st := v.vm.State(); st == vz.VirtualMachineStateStopped || st == vz.VirtualMachineStateError {
			return nil
		}
	}
	return v.vm.Stop()
}

// Listen registers the host's listener for guest dials to port.
func (v *vzVM) Listen(port uint32) (vzListener, error) {
	l, err := v.socket.Listen(port)
	if err != nil {
		return nil, err
	}
	return vsockListener{l}, nil
}

// vsockListener returns a nil net.Conn, not a typed nil, with an error:
// vz's own Accept returns its *VirtioSocketConnection as a net.Conn even
// when it is nil.
type vsockListener struct{ l *vz.VirtioSocketListener }

func (l vsockListener) Accept() (net.Conn, error) {
	c, err := l.l.AcceptVirtioSocketConnection()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("vsock accept: no connection: %w", errdefs.ErrUnavailable)
	}
	return c, nil
}

func (l vsockListener) Close() error { return l.l.Close() }
