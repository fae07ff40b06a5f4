package main

import (
	"math"

	"github.com/macvm/macvm/bench/internal/stats"
)

// Results is everything one run measured; it is written as JSON next to
// the Markdown report so that every number in the report can be traced to
// its samples.
type Results struct {
	Machine  Machine       `json:"machine"`
	Mode     string        `json:"mode"`
	Variants []VariantInfo `json:"variants"`
	Metrics  []*Metric     `json:"metrics"`
	Micro    []MicroResult `json:"micro,omitempty"`
	// Notes are facts about this run the reader needs (samples left out,
	// figures that could not be read).
	Notes []string `json:"notes,omitempty"`
	// Failures are measurements that failed, and why; a run with any fails.
	Failures []string `json:"failures,omitempty"`
	// Chart is the file name of the PNG chart beside the report ("" if
	// none could be drawn).
	Chart string `json:"chart,omitempty"`
}

// VariantInfo describes one runtime configuration measured.
type VariantInfo struct {
	Name    string `json:"name"`
	Runtime string `json:"runtime"`
	// Kernel is the guest kernel's version string (VM variants only).
	Kernel string `json:"kernel,omitempty"`
	// BootDir holds the vmlinux and initrd.img it boots.
	BootDir string `json:"boot_dir,omitempty"`
	// WarmStart is the shim's warm_start setting (VM variants only).
	WarmStart string `json:"warm_start,omitempty"`
}

// Group orders the report's tables.
type Group string

const (
	GroupLatency Group = "latency"
	GroupStream  Group = "throughput"
	GroupPhases  Group = "phases"
	GroupMemory  Group = "memory"
	GroupDensity Group = "density"
)

// Target is an issue-5 goal for a metric: either a bound on the ratio
// variant/runc or an absolute bound in the metric's unit.
type Target struct {
	// Ratio is true for a bound on the ratio to runc, false for an absolute one.
	Ratio bool `json:"ratio"`
	// Max is true for an upper bound (≤), false for a lower one (≥).
	Max   bool    `json:"max"`
	Value float64 `json:"value"`
	// Issue is the issue that sets the target when it is not issue 5
	// (the benchmark's own), e.g. 8 for warm start's memory per container.
	Issue int `json:"issue,omitempty"`
}

// Met reports whether s (and its ratio r to runc) meets the target.
func (t Target) Met(s stats.Summary, r float64) (met, known bool) {
	v := s.Median
	if t.Ratio {
		v = r
	}
	if s.N == 0 || math.IsNaN(v) {
		return false, false
	}
	if t.Max {
		return v <= t.Value, true
	}
	return v >= t.Value, true
}

// Metric is one measured quantity, with its samples per variant.
type Metric struct {
	ID     string `json:"id"`
	Group  Group  `json:"group"`
	Title  string `json:"title"`
	Unit   string `json:"unit"`
	Higher bool   `json:"higher_is_better,omitempty"`
	// VMOnly metrics have no runc counterpart (guest memory, boot phases).
	VMOnly bool `json:"vm_only,omitempty"`
	// NoRatio metrics are shown for both runtimes but a ratio means
	// nothing (a difference of two clocks that can be negative for runc).
	NoRatio bool                 `json:"no_ratio,omitempty"`
	Target  *Target              `json:"target,omitempty"`
	Samples map[string][]float64 `json:"samples"`
}

// add records one sample for variant v.
func (m *Metric) add(v string, x float64) {
	if m.Samples == nil {
		m.Samples = map[string][]float64{}
	}
	m.Samples[v] = append(m.Samples[v], x)
}

// metric returns the metric with id, creating it with the given shape on
// first use, so that scenarios can record samples without a registry.
func (r *Results) metric(id string, g Group, title, unit string, opts ...func(*Metric)) *Metric {
	for _, m := range r.Metrics {
		if m.ID == id {
			return m
		}
	}
	m := &Metric{ID: id, Group: g, Title: title, Unit: unit, Samples: map[string][]float64{}}
	for _, o := range opts {
		o(m)
	}
	r.Metrics = append(r.Metrics, m)
	return m
}

func higher(m *Metric)  { m.Higher = true }
func vmOnly(m *Metric)  { m.VMOnly = true }
func noRatio(m *Metric) { m.NoRatio = true }

func ratioMax(v float64) func(*Metric) {
	return func(m *Metric) { m.Target = &Target{Ratio: true, Max: true, Value: v} }
}
func ratioMin(v float64) func(*Metric) {
	return func(m *Metric) { m.Target = &Target{Ratio: true, Max: false, Value: v} }
}
func absMax(v float64) func(*Metric) {
	return func(m *Metric) { m.Target = &Target{Ratio: false, Max: true, Value: v} }
}

// issue marks the metric's target as set by another issue than 5; give it
// after the target option.
func issue(n int) func(*Metric) {
	return func(m *Metric) { m.Target.Issue = n }
}

// MicroResult is one line of `go test -bench` output.
type MicroResult struct {
	Name    string  `json:"name"`
	NsPerOp float64 `json:"ns_per_op"`
	MBPerS  float64 `json:"mb_per_s,omitempty"`
	Iters   int64   `json:"iterations"`
}
