package vm

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// Defaults for a Config that leaves sizes out.
const (
	DefaultCPUs      = 1
	DefaultMemoryMiB = 256
)

// The ids QEMU knows our devices by; agentPortID is what VSERPORT_CHANGE
// events name when the guest opens the agent port.
const (
	agentPortID = "agent0"
	agentCharID = "agentchr"
	qmpCharID   = "qmpchr"
)

// qemuOptions are the host facts and plumbing that, with a Config, make
// up a QEMU command line. Kept apart from process management so the
// command line can be unit-tested on any host.
type qemuOptions struct {
	// Arch is the guest (and host) GOARCH; only amd64 is implemented.
	Arch string
	// KVM selects hardware virtualisation; otherwise TCG emulates.
	KVM bool
	// TSCKHz is the host TSC frequency handed to the guest (0: unknown).
	TSCKHz int
	// ConsolePath receives the guest's serial console.
	ConsolePath string
	// AgentFD and QMPFD are the child's fd numbers of the connected
	// sockets for the agent port and the QMP monitor.
	AgentFD, QMPFD int
	// NICFDs are the child's fd numbers of Config.NICs' files, in order.
	NICFDs []int
	// Paused starts the VM stopped (-S) so QMP is set up before the
	// guest runs and no event can be missed.
	Paused bool
	// MemPath puts guest RAM in this file (a warm-start template's memory):
	// shared (MemShared) while the template is built, so the file receives
	// the RAM and migration skips it; private to each clone, which reads the
	// template and keeps its own writes. Empty: anonymous RAM.
	MemPath   string
	MemShared bool
	// Incoming starts QEMU waiting for a migration stream (-incoming defer)
	// instead of booting: a clone, restored with migrate-incoming.
	Incoming bool
}

// memBackendID names the RAM backend of a template and its clones; the
// RAM block carries this name in the migration stream, so it must not
// change between them.
const memBackendID = "mem"

// qemuArgs returns the arguments (without the binary) for one VM: a
// microvm booting an uncompressed vmlinux through PVH with no firmware,
// option ROMs, PIT or PIC, which measured fastest here under TCG.
func qemuArgs(cfg Config, o qemuOptions) ([]string, error) {
	if o.Arch != "amd64" {
		return nil, fmt.Errorf("qemu backend for %s guests: %w", o.Arch, errdefs.ErrNotImplemented)
	}
	if cfg.Kernel == "" {
		return nil, fmt.Errorf("vm %s: no kernel: %w", cfg.ID, errdefs.ErrInvalidArgument)
	}
	cpus, mem := cfg.CPUs, cfg.MemoryMiB
	if cpus == 0 {
		cpus = DefaultCPUs
	}
	if mem == 0 {
		mem = DefaultMemoryMiB
	}
	if cpus < 0 || mem < 0 {
		return nil, fmt.Errorf("vm %s: %d CPUs, %d MiB: %w", cfg.ID, cpus, mem, errdefs.ErrInvalidArgument)
	}

	args := []string{"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"}
	if o.Paused {
		args = append(args, "-S")
	}
	if o.KVM {
		args = append(args, "-accel", "kvm", "-cpu", "host")
	} else {
		// qemu64 lacks RDRAND, without which the guest's entropy pool
		// never fills and Go's crypto/rand blocks; -cpu max is slower.
		// thread=single runs every vCPU on one host thread: with one
		// thread per vCPU (MTTCG, QEMU's default) a guest that
		// live-patches its kernel text while another vCPU runs it
		// (x86 text_poke_bp: int3 first, as every static key flip does,
		// e.g. the first cpuset or memory cgroup, sched_schedstats)
		// can loop forever on an int3 already gone from memory but
		// still in that vCPU's translated code: the kernel's "int3 was
		// removed, run the instruction again" path re-executes the
		// stale translation. Seen as boots that never reached the agent
		// (both vCPUs in exc_int3/poke_int3_handler, soft lockups) and
		// reproduced in seconds by flipping sched_schedstats under load
		// (e2e/guest TestKernelTextPatching); with one thread it never
		// hangs. A VM with one vCPU (the shim's default) has a single
		// vCPU thread anyway and keeps QEMU's default.
		accel := "tcg"
		if cpus > 1 {
			accel += ",thread=single"
		}
		args = append(args, "-accel", accel+",tb-size="+strconv.Itoa(tcgCacheMiB(o.Incoming)), "-cpu", "qemu64,+rdrand")
	}
	machine := "microvm,x-option-roms=off,pit=off,pic=off"
	if o.MemPath != "" {
		share := "off"
		if o.MemShared {
			share = "on"
		}
		args = append(args, "-object", fmt.Sprintf("memory-backend-file,id=%s,size=%dM,mem-path=%s,share=%s",
			memBackendID, mem, escapeOpt(o.MemPath), share))
		machine += ",memory-backend=" + memBackendID
	}
	args = append(args,
		"-M", machine,
		"-smp", strconv.Itoa(cpus),
		"-m", strconv.Itoa(mem),
	)
	if o.Incoming {
		// A clone resumes a booted guest: QEMU would only load the kernel
		// and initramfs into its heap (fw_cfg) for nothing.
		args = append(args, "-incoming", "defer")
	} else {
		args = append(args,
			"-kernel", escapeOpt(cfg.Kernel),
			// microvm has no PCI bus (its virtio devices are MMIO, described
			// by ACPI): pci=off skips the probe and its "Fatal" console line.
			"-append", KernelCmdline("ttyS0", o.TSCKHz, append([]string{"pci=off"}, cfg.KernelArgs...)),
		)
		if cfg.Initrd != "" {
			args = append(args, "-initrd", escapeOpt(cfg.Initrd))
		}
	}
	args = append(args,
		"-chardev", "file,id=console,path="+escapeOpt(o.ConsolePath),
		"-serial", "chardev:console",
		"-chardev", fmt.Sprintf("socket,id=%s,fd=%d", qmpCharID, o.QMPFD),
		"-mon", "chardev="+qmpCharID+",mode=control",
		"-chardev", fmt.Sprintf("socket,id=%s,fd=%d", agentCharID, o.AgentFD),
		"-device", "virtio-serial-device,id=vser0",
		"-device", fmt.Sprintf("virtserialport,bus=vser0.0,chardev=%s,name=%s,id=%s", agentCharID, AgentPortName, agentPortID),
	)

	tags := map[string]bool{}
	for i, s := range cfg.Shares {
		if err := validTag(s.Tag); err != nil {
			return nil, fmt.Errorf("vm %s: share %s: %w", cfg.ID, s.HostPath, err)
		}
		if tags[s.Tag] {
			return nil, fmt.Errorf("vm %s: share tag %q used twice: %w", cfg.ID, s.Tag, errdefs.ErrInvalidArgument)
		}
		tags[s.Tag] = true
		if s.HostPath == "" {
			return nil, fmt.Errorf("vm %s: share %q has no host path: %w", cfg.ID, s.Tag, errdefs.ErrInvalidArgument)
		}
		// multidevs=remap: a share spans several host filesystems (the pod
		// share holds each container's rootfs and bind mounts), whose inode
		// numbers would otherwise collide in the guest.
		fsdev := fmt.Sprintf("local,id=fs%d,path=%s,security_model=none,multidevs=remap", i, escapeOpt(s.HostPath))
		if s.ReadOnly {
			fsdev += ",readonly=on"
		}
		args = append(args,
			"-fsdev", fsdev,
			"-device", fmt.Sprintf("virtio-9p-device,fsdev=fs%d,mount_tag=%s", i, s.Tag),
		)
	}
	for i, d := range cfg.Disks {
		if d.Path == "" {
			return nil, fmt.Errorf("vm %s: disk %d has no path: %w", cfg.ID, i, errdefs.ErrInvalidArgument)
		}
		// Named nodes (a file node under a raw one), not -drive: a
		// pooled VM's disk is a stand-in whose file node the shim swaps
		// for the container's image (blockdev-reopen), which QEMU only
		// allows on nodes with a name of their own (swapPooledDisks).
		ro := "off"
		if d.ReadOnly {
			ro = "on"
		}
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=file,node-name=%s,filename=%s,read-only=%s", diskFileNode(i), escapeOpt(d.Path), ro),
			"-blockdev", fmt.Sprintf("driver=raw,node-name=%s,file=%s,read-only=%s", diskNode(i), diskFileNode(i), ro),
			// The serial lets the guest match a disk to its index without
			// trusting the enumeration order. write-cache=on is what
			// -drive's default (cache=writeback) gave.
			"-device", fmt.Sprintf("virtio-blk-device,drive=%s,serial=%s,write-cache=on", diskNode(i), DiskSerial(i)),
		)
	}
	nics, err := nicArgs(cfg, o.NICFDs)
	if err != nil {
		return nil, err
	}
	return append(args, nics...), nil
}

// nicArgs attaches each NIC as a virtio-net-device (microvm has no PCI)
// over the fd the child inherits: -netdev tap,fd= for a tap, -netdev
// dgram with an fd as local address for the user-space stack's datagram
// socket (QEMU sends each frame as one datagram on the connected socket).
func nicArgs(cfg Config, fds []int) ([]string, error) {
	if len(fds) != len(cfg.NICs) {
		return nil, fmt.Errorf("vm %s: %d NICs but %d fds: %w", cfg.ID, len(cfg.NICs), len(fds), errdefs.ErrInvalidArgument)
	}
	var args []string
	for i, n := range cfg.NICs {
		var netdev string
		switch n.Kind {
		case NICTap:
			netdev = fmt.Sprintf("tap,id=net%d,fd=%d", i, fds[i])
		case NICDatagram:
			netdev = fmt.Sprintf("dgram,id=net%d,local.type=fd,local.str=%d", i, fds[i])
		default:
			return nil, fmt.Errorf("vm %s: NIC %d: kind %d: %w", cfg.ID, i, n.Kind, errdefs.ErrInvalidArgument)
		}
		dev := fmt.Sprintf("virtio-net-device,netdev=net%d", i)
		if len(n.MAC) != 0 {
			if len(n.MAC) != 6 {
				return nil, fmt.Errorf("vm %s: NIC %d: MAC %s is not 48-bit: %w", cfg.ID, i, n.MAC, errdefs.ErrInvalidArgument)
			}
			dev += ",mac=" + n.MAC.String()
		}
		args = append(args, "-netdev", netdev, "-device", dev)
	}
	return args, nil
}

// TCG translation cache sizes (MiB). QEMU's default is 1 GiB, and the
// cache never shrinks: it is only flushed, then reused, once full. Code is
// translated again for every new guest virtual address (each exec of a
// PIE binary under ASLR) and after the guest rewrites a page that held
// code, so a busy VM's cache grows by ~0.5-1 MiB per exec until it reaches
// the size: measured, a clone running one dd and five execs per round went
// 24 -> 47 MiB in four rounds. The cap bounds that growth. It is not made
// smaller: the working set of one exec exceeds 16 MiB, and caps of 8 and
// 16 MiB made QEMU's CPU per `exec true` 8 and 5 times larger (0.84 and
// 0.49 s against 0.10 s), each exec flushing and translating again.
//
// A clone's cache holds only what ran since its restore (~24 MiB with an
// idle container); a cold boot's holds the boot's code too (~57 MiB after
// boot and one container), so it gets twice the room rather than a flush
// during the boot.
const (
	tcgCacheCloneMiB = 64
	tcgCacheColdMiB  = 128
)

func tcgCacheMiB(clone bool) int {
	if clone {
		return tcgCacheCloneMiB
	}
	return tcgCacheColdMiB
}

// escapeOpt doubles commas, QEMU's escape inside option values, so a path
// with a comma cannot inject options.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// validTag accepts what both 9p and virtiofs accept and what a guest
// mount option string can carry unquoted.
func validTag(tag string) error {
	if tag == "" || len(tag) >= 32 {
		return fmt.Errorf("tag %q must be 1-31 bytes: %w", tag, errdefs.ErrInvalidArgument)
	}
	for _, r := range tag {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return fmt.Errorf("tag %q: only letters, digits, '_', '-' and '.': %w", tag, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// diskNode is the raw format node of disk i (the virtio-blk device's
// drive); diskFileNode the file node below it that the VM booted with.
func diskNode(i int) string     { return "disk" + strconv.Itoa(i) }
func diskFileNode(i int) string { return "disk" + strconv.Itoa(i) + "-file" }
