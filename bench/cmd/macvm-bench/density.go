package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/macvm/macvm/bench/internal/procmem"
)

// measureDensity starts mode.Density containers of one variant at once
// (`ctr run -d` in parallel) and records how long until all run, what
// they cost together, and how long removing them takes. Variants take
// turns, one round each.
func (b *bench) measureDensity(ctx context.Context) error {
	n := b.cfg.mode.Density
	for round := 0; round < b.cfg.mode.DensityRounds; round++ {
		for _, v := range b.rotate(round) {
			if err := b.densityOnce(ctx, v, n); err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *bench) densityOnce(ctx context.Context, v *variant, n int) error {
	ds := make([]detached, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ds[i], _, errs[i] = b.startDetached(ctx, v, "dens")
		}()
	}
	wg.Wait()
	up := time.Since(t0)
	var started []detached
	for i := range ds {
		if errs[i] == nil {
			started = append(started, ds[i])
		}
	}
	defer func() {
		if len(started) > 0 {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
			defer cancel()
			_ = b.removeDetached(cctx, started)
		}
	}()
	for _, err := range errs {
		if err != nil {
			return fmt.Errorf("%s: starting %d containers at once: %w", v.info.Name, n, err)
		}
	}
	// The same settling time as the single-container memory figures.
	time.Sleep(2 * time.Second)
	var total procmem.Usage
	for _, d := range ds {
		cm, err := b.hostMemory(d.id)
		if err != nil {
			return err
		}
		total = total.Add(cm.total())
		if v.vm() {
			// Issue 8's target: "memory per running container (PSS)
			// <= 40 MB for the hypervisor".
			b.res.metric("density.hv_pss_each", GroupDensity, fmt.Sprintf("hypervisor PSS per container, %d running", n), "MiB", vmOnly, absMax(40e6/mib), issue(8)).add(v.info.Name, toMiB(cm.hypervisor.PSS))
			// The parts of that figure: QEMU's TCG translation cache,
			// which software emulation needs and KVM and
			// Virtualization.framework (guest code runs natively) do not
			// have, and the rest. A measurement of the parts, not of a
			// KVM run.
			tcg, err := tcgCache(cm.hvPids)
			if err != nil {
				return fmt.Errorf("%s: TCG translation cache of %s: %w", v.info.Name, d.id, err)
			}
			b.res.metric("density.hv_tcg_each", GroupDensity, fmt.Sprintf("… of which TCG translation cache (QEMU's code_gen_buffer: KVM and Virtualization.framework have none), %d running", n), "MiB", vmOnly).add(v.info.Name, toMiB(tcg.PSS))
			b.res.metric("density.hv_pss_each_notcg", GroupDensity, fmt.Sprintf("… the rest: hypervisor PSS per container less its TCG cache (measured under TCG), %d running", n), "MiB", vmOnly).add(v.info.Name, toMiB(cm.hypervisor.PSS-tcg.PSS))
			if cm.hypervisor.Anon > 0 {
				b.res.metric("density.hv_anon_each", GroupDensity, fmt.Sprintf("hypervisor anonymous PSS per container, %d running", n), "MiB", vmOnly).add(v.info.Name, toMiB(cm.hypervisor.Anon))
			}
		}
	}
	b.res.metric("density.up", GroupDensity, fmt.Sprintf("%d containers started at once: all running", n), "s").add(v.info.Name, up.Seconds())
	b.res.metric("density.total_pss", GroupDensity, fmt.Sprintf("%d running: host PSS of shims and everything below", n), "MiB").add(v.info.Name, toMiB(total.PSS))
	b.res.metric("density.total_rss", GroupDensity, fmt.Sprintf("%d running: host RSS of shims and everything below", n), "MiB").add(v.info.Name, toMiB(total.RSS))

	t1 := time.Now()
	err := b.removeDetached(ctx, started)
	started = nil
	if err != nil {
		return err
	}
	down := time.Since(t1)
	b.res.metric("density.down", GroupDensity, fmt.Sprintf("%d containers killed and deleted, one after another", n), "s").add(v.info.Name, down.Seconds())
	logf("density %-14s %d up in %.1fs, total PSS %.0f MiB, removed in %.1fs", v.info.Name, n, up.Seconds(), toMiB(total.PSS), down.Seconds())
	return nil
}
