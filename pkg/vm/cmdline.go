package vm

import (
	"fmt"
	"strings"
)

// AgentPortName is the name of the virtio-serial port (QEMU) that carries
// the agent channel; the guest finds it in /sys/class/virtio-ports/*/name.
const AgentPortName = "agent"

// AgentChannelArg tells the guest agent which channel to open. It is part
// of the kernel command line contract between the backends and the agent.
const AgentChannelArg = "macvm.channel=serial:" + AgentPortName

// tunedKernelArgs are the boot parameters measured to matter for a
// throw-away VM under TCG (docs: platform-facts.md): no KASLR, no
// mitigations and no allocator hardening inside a VM that runs one
// container, no timer and crypto self-checks, one UART, and an entropy
// pool that trusts RDRAND so the Go runtime never blocks on getrandom.
// panic=-1 reboots at once on a panic, which -no-reboot turns into an exit.
var tunedKernelArgs = []string{
	"quiet", "panic=-1", "tsc=reliable", "no_timer_check", "mitigations=off", "nokaslr",
	"8250.nr_uarts=1", "random.trust_cpu=on", "init_on_alloc=0", "hardened_usercopy=off",
	"randomize_kstack_offset=off", "page_alloc.shuffle=0", "cryptomgr.notests", "audit=0",
	"rdinit=/init",
}

// KernelCmdline assembles the guest kernel command line: the console, the
// tuned parameters, the agent channel, then the caller's extra arguments
// (last, so they win over ours where the kernel takes the last value).
// tscKHz, when positive, skips the TSC calibration that can hang a
// microvm guest without a PIT.
func KernelCmdline(console string, tscKHz int, extra []string) string {
	args := []string{"console=" + console}
	args = append(args, tunedKernelArgs...)
	if tscKHz > 0 {
		args = append(args, fmt.Sprintf("tsc_early_khz=%d", tscKHz))
	}
	args = append(args, AgentChannelArg)
	args = append(args, extra...)
	return strings.Join(args, " ")
}
