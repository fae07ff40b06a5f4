package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/macvm/macvm/bench/internal/procmem"
	"github.com/macvm/macvm/e2e/harness"
)

const mib = 1 << 20

// guestRootPidNS makes a VM container share the guest's root PID
// namespace (the path is resolved inside the guest), so that the agent,
// PID 1 of the VM, is visible from an exec and its memory can be read.
// It changes nothing that is measured: exec and stdio take the same path.
var guestRootPidNS = []string{"--with-ns", "pid:/proc/1/ns/pid"}

// detached is a long-running container of one variant.
type detached struct {
	v  *variant
	id string
}

// startDetached runs `sleep` in a new container of v with `ctr run -d`,
// which returns once the task has started.
func (b *bench) startDetached(ctx context.Context, v *variant, what string) (detached, time.Duration, error) {
	id := b.id(v, what)
	var extra []string
	extra = append(extra, "-d")
	if v.vm() {
		extra = append(extra, guestRootPidNS...)
	}
	r, err := b.ctr(ctx, nil, b.runArgs(v, extra, id, "sleep", "100000")...)
	if err != nil {
		return detached{}, 0, err
	}
	return detached{v: v, id: id}, r.wall(), nil
}

// removeDetached kills and deletes containers through ctr.
func (b *bench) removeDetached(ctx context.Context, ds []detached) error {
	var firstErr error
	for _, d := range ds {
		_, _ = b.ctr(ctx, nil, "task", "kill", "-s", "SIGKILL", d.id)
	}
	for _, d := range ds {
		// ctr task delete waits for the exit only if we ask it to; poll the
		// state instead of racing the kill.
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			r, _ := b.ctr(ctx, nil, "task", "ls")
			_, _, _, out := r.stdout.snapshot()
			if !strings.Contains(out, d.id) || strings.Contains(lineOf(out, d.id), "STOPPED") {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := b.ctr(ctx, nil, "task", "delete", d.id); err != nil && firstErr == nil && !strings.Contains(err.Error(), "not found") {
			firstErr = err
		}
		if _, err := b.ctr(ctx, nil, "containers", "delete", d.id); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	return firstErr
}

func lineOf(text, word string) string {
	for _, l := range strings.Split(text, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == word {
			return l
		}
	}
	return ""
}

// measureExecAndStreams starts one idle container per variant, reads its
// memory, then times execs into it and stdout/stdin streams through it.
func (b *bench) measureExecAndStreams(ctx context.Context) error {
	var ds []detached
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := b.removeDetached(cctx, ds); err != nil {
			b.res.Notes = append(b.res.Notes, fmt.Sprintf("removing the exec containers: %v", err))
		}
	}()
	for _, v := range b.variants {
		d, wall, err := b.startDetached(ctx, v, "exec")
		if err != nil {
			return err
		}
		logf("detached %-14s running after %.3fs", v.info.Name, wall.Seconds())
		ds = append(ds, d)
	}
	if b.cfg.wants("memory") || b.cfg.wants("exec") {
		// Let the boot's transient allocations settle before reading memory.
		time.Sleep(2 * time.Second)
		for _, d := range ds {
			if err := b.measureMemory(ctx, d); err != nil {
				return fmt.Errorf("memory of %s: %w", d.v.info.Name, err)
			}
		}
	}
	byVariant := map[*variant]detached{}
	for _, d := range ds {
		byVariant[d.v] = d
	}
	if b.cfg.wants("exec") {
		m := b.res.metric("exec.wall", GroupLatency, "`ctr task exec` of `true` (wall)", "s", ratioMax(1.5))
		for i := 0; i < b.cfg.mode.Execs; i++ {
			for _, v := range b.rotate(i) {
				d := byVariant[v]
				r, err := b.ctr(ctx, nil, "task", "exec", "--exec-id", fmt.Sprintf("x%d", i), d.id, "true")
				if err != nil {
					return err
				}
				m.add(v.info.Name, r.wall().Seconds())
			}
		}
	}
	if b.cfg.wants("exec") || b.cfg.wants("stream") {
		n := b.cfg.mode.StreamMiB
		out := b.res.metric("stream.stdout", GroupStream, fmt.Sprintf("stdout, `dd bs=1M count=%d` (first byte → EOF)", n), "MB/s", higher, ratioMin(0.7))
		outWall := b.res.metric("stream.stdout_wall", GroupStream, fmt.Sprintf("stdout, `dd bs=1M count=%d` (whole exec)", n), "MB/s", higher)
		in := b.res.metric("stream.stdin", GroupStream, fmt.Sprintf("stdin, %d MiB into `dd of=/dev/null bs=1M` (whole exec)", n), "MB/s", higher)
		for i := 0; i < b.cfg.mode.Streams; i++ {
			for _, v := range b.rotate(i) {
				d := byVariant[v]
				cpu0 := b.cpuSample(d)
				r, err := b.ctr(ctx, nil, "task", "exec", "--exec-id", fmt.Sprintf("out%d", i), d.id,
					"dd", "if=/dev/zero", "bs=1M", fmt.Sprintf("count=%d", n))
				if err != nil {
					return err
				}
				b.recordCPU("stdout", v, cpu0, b.cpuSample(d), r, n)
				first, last, got, _ := r.stdout.snapshot()
				if got != int64(n)*mib {
					return fmt.Errorf("%s: stdout carried %d bytes, want %d", v.info.Name, got, int64(n)*mib)
				}
				bytes := float64(got)
				out.add(v.info.Name, bytes/last.Sub(first).Seconds()/1e6)
				outWall.add(v.info.Name, bytes/r.wall().Seconds()/1e6)

				cpu0 = b.cpuSample(d)
				// dd, not wc -c: busybox wc reads through stdio a character at a
				// time, which under TCG is slower than the channel itself.
				r, err = b.ctr(ctx, io.LimitReader(zeros{}, int64(n)*mib), "task", "exec", "--exec-id", fmt.Sprintf("in%d", i), d.id,
					"dd", "of=/dev/null", "bs=1M", "iflag=fullblock")
				if err != nil {
					return err
				}
				b.recordCPU("stdin", v, cpu0, b.cpuSample(d), r, n)
				if got := ddRecords(r.stderr.String()); got != fmt.Sprintf("%d+0", n) {
					return fmt.Errorf("%s: dd read %q records of 1 MiB from stdin, want %d+0 (stderr %q)", v.info.Name, got, n, r.stderr.String())
				}
				in.add(v.info.Name, bytes/r.wall().Seconds()/1e6)
				logf("stream %-14s stdout %7.1f MB/s, stdin %7.1f MB/s", v.info.Name, bytes/last.Sub(first).Seconds()/1e6, bytes/r.wall().Seconds()/1e6)
			}
		}
	}
	return nil
}

// zeros is an endless reader of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// containerMemory is what one running container costs on the host.
type containerMemory struct {
	shim, hypervisor, rest procmem.Usage
	// hvPids are the hypervisor processes counted in hypervisor.
	hvPids []int
}

func (c containerMemory) total() procmem.Usage { return c.shim.Add(c.hypervisor).Add(c.rest) }

// hostMemory reads the shim of container id and all its descendants; the
// hypervisor is the descendant running qemu-system-*, or, for a VM handed
// over by the pool daemon (whose child it is), the pid the shim logged in
// its "VM started" line.
func (b *bench) hostMemory(id string) (containerMemory, error) {
	var cm containerMemory
	shim, err := b.cd.ShimPid(id)
	if err != nil {
		return cm, err
	}
	if cm.shim, err = procmem.Of(shim); err != nil {
		return cm, err
	}
	desc, err := harness.Descendants(shim)
	if err != nil {
		return cm, err
	}
	foundVM := false
	for _, p := range desc {
		u, err := procmem.Of(p.Pid)
		if err != nil {
			if os.IsNotExist(err) {
				continue
			}
			return cm, err
		}
		if isQEMU(p.Cmdline) {
			cm.hypervisor = cm.hypervisor.Add(u)
			cm.hvPids = append(cm.hvPids, p.Pid)
			foundVM = true
		} else {
			cm.rest = cm.rest.Add(u)
		}
	}
	if !foundVM {
		if pid := b.vmPid(id); pid > 0 {
			if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && isQEMU(strings.ReplaceAll(string(cmd), "\x00", " ")) {
				u, err := procmem.Of(pid)
				if err != nil {
					return cm, err
				}
				cm.hypervisor = u
				cm.hvPids = []int{pid}
			}
		}
	}
	return cm, nil
}

// vmPid is the hypervisor pid the shim logged for container id (0 if none).
func (b *bench) vmPid(id string) int {
	times, err := scanStartPathFile(b.cd.LogPath)
	if err != nil || times[id] == nil {
		return 0
	}
	return times[id].VMPid
}

// isQEMU says whether a command line runs qemu-system-*.
func isQEMU(cmdline string) bool {
	return strings.Contains(strings.Fields(cmdline + " x")[0], "qemu-system")
}

func toMiB(b int64) float64 { return float64(b) / mib }

// tcgCache sums the TCG translation caches (QEMU's code_gen_buffer) of
// hypervisor processes pids, each sized by the tb-size on its command line.
// A QEMU without tb-size (KVM) has none and counts as zero.
func tcgCache(pids []int) (procmem.Usage, error) {
	var total procmem.Usage
	for _, pid := range pids {
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			return total, err
		}
		mib, ok := procmem.TBSizeArg(strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00"))
		if !ok {
			continue
		}
		u, err := procmem.CodeGenBuffer(pid, mib)
		if err != nil {
			return total, err
		}
		total = total.Add(u)
	}
	return total, nil
}

// hvAnonTitle names the hypervisor's anonymous PSS: the part of its PSS that
// is its own (see procmem.Usage.Anon). The rest are file pages it shares:
// QEMU's binary and libraries and, for a template clone or pooled VM, the
// template's RAM pages it has read. PSS charges each of those pages to every
// process mapping it in equal parts, so a lone clone pays for all the
// template pages it touched and each of ten clones for about a tenth: the
// density rows are the cost per running container when VMs share a template.
const hvAnonTitle = "hypervisor (qemu) anonymous PSS: its own (heap, TCG cache, guest pages written), no shared template or library pages"

// templateAccounting is the report's note on how the memory rows count a
// warm-start template's RAM.
const templateAccounting = "hypervisor PSS of a template clone or pooled VM includes its share of the template's RAM pages it has read " +
	"(the page cache of the template's memory file, charged in equal parts to every VM mapping a page): one clone alone pays for all of them " +
	"(memory rows), ten clones of one template a tenth each (density rows: the cost per running container); " +
	"the anonymous PSS rows are what each VM holds for itself whatever runs beside it"

// measureMemory records what container d costs: on the host, its shim,
// hypervisor and other processes; in a VM, the guest's used memory and the
// agent's RSS.
func (b *bench) measureMemory(ctx context.Context, d detached) error {
	cm, err := b.hostMemory(d.id)
	if err != nil {
		return err
	}
	name := d.v.info.Name
	b.res.metric("mem.shim_rss", GroupMemory, "shim RSS", "MiB", absMax(15)).add(name, toMiB(cm.shim.RSS))
	b.res.metric("mem.shim_pss", GroupMemory, "shim PSS", "MiB").add(name, toMiB(cm.shim.PSS))
	if d.v.vm() {
		b.res.metric("mem.hv_rss", GroupMemory, "hypervisor (qemu) RSS", "MiB", vmOnly, absMax(140*1e6/mib)).add(name, toMiB(cm.hypervisor.RSS))
		b.res.metric("mem.hv_pss", GroupMemory, "hypervisor (qemu) PSS", "MiB", vmOnly).add(name, toMiB(cm.hypervisor.PSS))
		if cm.hypervisor.Anon > 0 {
			b.res.metric("mem.hv_anon", GroupMemory, hvAnonTitle, "MiB", vmOnly).add(name, toMiB(cm.hypervisor.Anon))
		}
		if w := d.v.info.WarmStart; (w == "template" || w == "pool") && !slices.Contains(b.res.Notes, templateAccounting) {
			b.res.Notes = append(b.res.Notes, templateAccounting)
		}
	} else {
		b.res.metric("mem.ctr_rss", GroupMemory, "container processes on the host RSS (runc: `sleep`)", "MiB").add(name, toMiB(cm.rest.RSS))
	}
	b.res.metric("mem.total_pss", GroupMemory, "host total PSS (shim + everything below it)", "MiB").add(name, toMiB(cm.total().PSS))
	if !d.v.vm() {
		return nil
	}
	r, err := b.ctr(ctx, nil, "task", "exec", "--exec-id", "meminfo", d.id, "cat", "/proc/meminfo")
	if err != nil {
		return err
	}
	_, _, _, text := r.stdout.snapshot()
	mi, err := procmem.ParseMeminfo([]byte(text))
	if err != nil {
		return err
	}
	b.res.metric("mem.guest_used", GroupMemory, "guest used (MemTotal − MemAvailable)", "MiB", vmOnly).add(name, toMiB(mi.Used()))
	b.res.metric("mem.guest_total", GroupMemory, "guest MemTotal", "MiB", vmOnly).add(name, toMiB(mi.Total))
	r, err = b.ctr(ctx, nil, "task", "exec", "--exec-id", "agent", d.id, "cat", "/proc/1/status")
	if err != nil {
		return err
	}
	_, _, _, status := r.stdout.snapshot()
	if strings.Contains(status, "\nName:\tsleep") || strings.HasPrefix(status, "Name:\tsleep") {
		b.res.Notes = append(b.res.Notes, fmt.Sprintf("%s: PID 1 of the exec is the container's own: agent RSS not read", name))
		return nil
	}
	rss, err := procmem.StatusRSS([]byte(status))
	if err != nil {
		return err
	}
	b.res.metric("mem.agent_rss", GroupMemory, "guest agent (PID 1 in the VM) RSS", "MiB", vmOnly, absMax(10)).add(name, toMiB(rss))
	logf("memory %-14s shim %.1f MiB, hypervisor %.1f MiB RSS / %.1f PSS, guest used %.1f MiB, agent %.1f MiB",
		name, toMiB(cm.shim.RSS), toMiB(cm.hypervisor.RSS), toMiB(cm.hypervisor.PSS), toMiB(mi.Used()), toMiB(rss))
	return nil
}

// cpuSample reads the CPU time used so far by container d's shim and, for
// a VM, its hypervisor: split by thread kind when QEMU names its threads,
// "vcpu" (the TCG or KVM vCPU threads, i.e. the guest: the process, the
// agent, the guest kernel) and "qemu-io" (every other thread: the main
// loop serving the virtio-serial chardev and 9p), otherwise "qemu" for
// the whole process. Missing figures are left out.
func (b *bench) cpuSample(d detached) map[string]time.Duration {
	out := map[string]time.Duration{}
	shim, err := b.cd.ShimPid(d.id)
	if err != nil {
		return out
	}
	if c, err := procmem.CPU(shim); err == nil {
		out["shim"] = c
	}
	desc, err := harness.Descendants(shim)
	if err != nil {
		return out
	}
	for _, p := range desc {
		if !strings.Contains(strings.Fields(p.Cmdline + " x")[0], "qemu-system") {
			continue
		}
		th, err := procmem.Threads(p.Pid)
		if err != nil {
			continue
		}
		// QEMU names its threads only with -name debug-threads=on; without
		// names the split is unknown and the whole process is reported.
		named := false
		for name := range th {
			if strings.HasPrefix(name, "CPU ") {
				named = true
			}
		}
		for name, c := range th {
			switch {
			case !named:
				out["qemu"] += c
			case strings.HasPrefix(name, "CPU "):
				out["vcpu"] += c
			default:
				out["qemu-io"] += c
			}
		}
	}
	return out
}

// recordCPU turns two samples around one stream exec into CPU
// milliseconds per MiB moved, per process: where the time of a transfer
// goes, measured in a way that other load on the machine barely changes.
func (b *bench) recordCPU(dir string, v *variant, before, after map[string]time.Duration, r *ctrRun, n int) {
	per := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }
	if r.cpu > 0 {
		b.res.metric("cpu."+dir+".ctr", GroupStream, dir+": ctr's CPU per MiB", "ms/MiB").add(v.info.Name, per(r.cpu))
	}
	for _, k := range []string{"shim", "qemu", "vcpu", "qemu-io"} {
		a, ok1 := after[k]
		bf, ok2 := before[k]
		if !ok1 || !ok2 {
			continue
		}
		title := map[string]string{
			"shim":    dir + ": shim's CPU per MiB",
			"qemu":    dir + ": QEMU's CPU per MiB (all threads: the emulated guest — process, agent, kernel — and device emulation)",
			"vcpu":    dir + ": guest vCPU thread's CPU per MiB (process + agent + guest kernel, emulated)",
			"qemu-io": dir + ": QEMU's other threads' CPU per MiB (virtio-serial chardev, main loop)",
		}[k]
		opts := []func(*Metric){}
		if k != "shim" {
			opts = append(opts, vmOnly)
		}
		b.res.metric("cpu."+dir+"."+k, GroupStream, title, "ms/MiB", opts...).add(v.info.Name, per(a-bf))
	}
}

// ddRecords reads "FULL+PARTIAL" from dd's "records in" line on stderr.
// With iflag=fullblock and bs=1M, exactly N MiB of input reads as "N+0"
// (busybox dd prints no byte count).
func ddRecords(stderr string) string {
	for _, l := range strings.Split(stderr, "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[1] == "records" && f[2] == "in" {
			return f[0]
		}
	}
	return ""
}
