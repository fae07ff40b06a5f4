package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"
)

// runRecord is one `ctr run --rm` sample, kept until the log and the
// events for it have been collected.
type runRecord struct {
	v          *variant
	id         string
	start, end time.Time
	firstByte  time.Time
}

// measureRun times `ctr run --rm IMG ID true`, and splits each run into
// phases from the events and start-path log lines.
func (b *bench) measureRun(ctx context.Context) error {
	wall := b.res.metric("run.wall", GroupLatency, "`ctr run --rm` of `true` (wall)", "s", ratioMax(2.5))
	var recs []runRecord
	for i := 0; i < b.cfg.mode.Runs; i++ {
		for _, v := range b.rotate(i) {
			id := b.id(v, "run")
			r, err := b.ctr(ctx, nil, b.runArgs(v, []string{"--rm"}, id, "true")...)
			if err != nil {
				return err
			}
			wall.add(v.info.Name, r.wall().Seconds())
			recs = append(recs, runRecord{v: v, id: id, start: r.start, end: r.end})
			logf("run %-14s %6.3fs", v.info.Name, r.wall().Seconds())
		}
	}
	return b.phases(recs, false)
}

// measureFirstOutput times `ctr run --rm IMG ID echo` to the first byte
// of output ctr prints.
func (b *bench) measureFirstOutput(ctx context.Context) error {
	first := b.res.metric("run.first_output", GroupLatency, "`ctr run --rm` of `echo`: first output", "s", ratioMax(2.5))
	var recs []runRecord
	for i := 0; i < b.cfg.mode.Runs; i++ {
		for _, v := range b.rotate(i) {
			id := b.id(v, "echo")
			r, err := b.ctr(ctx, nil, b.runArgs(v, []string{"--rm"}, id, "echo", "hello")...)
			if err != nil {
				return err
			}
			t, _, _, head := r.stdout.snapshot()
			if strings.TrimSpace(head) != "hello" {
				return fmt.Errorf("%s: echo printed %q, want hello", v.info.Name, head)
			}
			first.add(v.info.Name, t.Sub(r.start).Seconds())
			recs = append(recs, runRecord{v: v, id: id, start: r.start, end: r.end, firstByte: t})
			logf("echo %-14s first output %6.3fs, wall %6.3fs", v.info.Name, t.Sub(r.start).Seconds(), r.wall().Seconds())
		}
	}
	return b.phases(recs, true)
}

// phases turns the runs' events and log lines into phase metrics. A phase
// whose end points are missing (an event not delivered) is left out of
// that run and reported as a note, not as a zero.
func (b *bench) phases(recs []runRecord, output bool) error {
	logTimes, err := scanStartPathFile(b.cd.LogPath)
	if err != nil {
		return err
	}
	type phase struct {
		id, title string
		vmOnly    bool
		from, to  func(ev map[string]time.Time, lg *startPath, r runRecord) time.Time
	}
	ev := func(topic string) func(ev map[string]time.Time, lg *startPath, r runRecord) time.Time {
		return func(ev map[string]time.Time, _ *startPath, _ runRecord) time.Time { return ev[topic] }
	}
	lg := func(msg string) func(ev map[string]time.Time, lg *startPath, r runRecord) time.Time {
		return func(_ map[string]time.Time, lg *startPath, _ runRecord) time.Time { return lg.at(msg) }
	}
	start := func(_ map[string]time.Time, _ *startPath, r runRecord) time.Time { return r.start }
	end := func(_ map[string]time.Time, _ *startPath, r runRecord) time.Time { return r.end }
	firstByte := func(_ map[string]time.Time, _ *startPath, r runRecord) time.Time { return r.firstByte }

	var list []phase
	if output {
		list = []phase{{"phase.first_output", "task started → first output at ctr", false, ev(topicStart), firstByte}}
	} else {
		list = []phase{
			{"phase.shim", "ctr start → shim connected (bootstrap)", false, start, lg(msgShimConnect)},
			{"phase.create", "Create RPC (shim connected → TaskCreate)", false, lg(msgShimConnect), ev(topicCreate)},
			{"phase.vm_start", "… shim connected → VM process started", true, lg(msgShimConnect), lg(msgVMStarted)},
			{"phase.boot", "… VM started → agent ready", true, lg(msgVMStarted), lg(msgAgentReady)},
			{"phase.guest_create", "… agent ready → container created (TaskCreate)", true, lg(msgAgentReady), ev(topicCreate)},
			{"phase.agent_ready", "(the shim's own figure: hypervisor exec → agent answering, cold boot or clone)", true, nil, nil},
			{"phase.start", "task start (TaskCreate → TaskStart)", false, ev(topicCreate), ev(topicStart)},
			{"phase.run", "process runs `true` (TaskStart → TaskExit)", false, ev(topicStart), ev(topicExit)},
			{"phase.teardown", "teardown (TaskExit → ctr exited)", false, ev(topicExit), end},
		}
	}
	// Create the metrics in the list's order, so the report's rows follow the start path.
	for _, p := range list {
		switch {
		case p.vmOnly:
			b.res.metric(p.id, GroupPhases, p.title, "s", vmOnly)
		case output:
			// runc's output can reach ctr before its shim stamps TaskStart.
			b.res.metric(p.id, GroupPhases, p.title, "s", noRatio)
		default:
			b.res.metric(p.id, GroupPhases, p.title, "s")
		}
	}
	missing := 0
	// modes counts, per variant, the start modes its VMs reported.
	modes := map[string]map[string]int{}
	for _, r := range recs {
		evs := b.events.get(r.id, 5*time.Second, topicCreate, topicStart, topicExit)
		lgs := logTimes[r.id]
		for _, p := range list {
			if p.vmOnly && !r.v.vm() {
				continue
			}
			m := b.res.metric(p.id, GroupPhases, p.title, "s")
			if p.from == nil {
				if lgs == nil || lgs.AgentReady == 0 {
					missing++
					continue
				}
				m.add(r.v.info.Name, lgs.AgentReady.Seconds())
				continue
			}
			from, to := p.from(evs, lgs, r), p.to(evs, lgs, r)
			if from.IsZero() || to.IsZero() {
				missing++
				continue
			}
			m.add(r.v.info.Name, to.Sub(from).Seconds())
		}
		if r.v.vm() && !output {
			mode := "unreported"
			if lgs != nil && lgs.Mode != "" {
				mode = lgs.Mode
			}
			if modes[r.v.info.Name] == nil {
				modes[r.v.info.Name] = map[string]int{}
			}
			modes[r.v.info.Name][mode]++
		}
	}
	for _, v := range b.variants {
		if c := modes[v.info.Name]; c != nil {
			b.res.Notes = append(b.res.Notes, fmt.Sprintf("start modes of `%s`'s `ctr run --rm` VMs (shim log `start_mode`): %s", v.info.Name, formatCounts(c)))
		}
	}
	if missing > 0 {
		b.res.Notes = append(b.res.Notes, fmt.Sprintf("%d phase sample(s) lacked an event or log line and were left out", missing))
	}
	return nil
}

// formatCounts renders {"cold": 2, "template": 3} as "cold 2, template 3".
func formatCounts(c map[string]int) string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, c[k])
	}
	return strings.Join(parts, ", ")
}
