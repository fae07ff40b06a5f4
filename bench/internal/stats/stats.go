// Package stats summarises repeated measurements the way the benchmark
// reports them: the median (robust against the noise of a shared machine),
// the spread as min..max and the interquartile range, and ratios of medians.
package stats

import (
	"math"
	"sort"
	"time"
)

// Summary describes one measured quantity over several runs.
type Summary struct {
	N                 int
	Median, Min, Max  float64
	P25, P75          float64
	Mean              float64
	RelativeSpreadIQR float64 // (P75-P25)/Median; 0 when Median is 0
	values            []float64
}

// Of summarises xs. An empty input gives a zero Summary (N == 0), which
// reports print as "n/a" rather than as a measured zero.
func Of(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	sum := 0.0
	for _, x := range s {
		sum += x
	}
	out := Summary{
		N:      len(s),
		Median: Quantile(s, 0.5),
		Min:    s[0],
		Max:    s[len(s)-1],
		P25:    Quantile(s, 0.25),
		P75:    Quantile(s, 0.75),
		Mean:   sum / float64(len(s)),
		values: s,
	}
	if out.Median != 0 {
		out.RelativeSpreadIQR = (out.P75 - out.P25) / out.Median
	}
	return out
}

// Durations summarises durations in seconds.
func Durations(ds []time.Duration) Summary {
	xs := make([]float64, len(ds))
	for i, d := range ds {
		xs[i] = d.Seconds()
	}
	return Of(xs)
}

// Values returns the sorted samples.
func (s Summary) Values() []float64 { return s.values }

// Quantile returns the q-quantile (0..1) of sorted xs by linear
// interpolation between closest ranks (type 7, what R and numpy default to).
func Quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	if q <= 0 {
		return sorted[0]
	}
	if q >= 1 {
		return sorted[len(sorted)-1]
	}
	h := q * float64(len(sorted)-1)
	lo := math.Floor(h)
	i := int(lo)
	if i+1 >= len(sorted) {
		return sorted[i]
	}
	return sorted[i] + (h-lo)*(sorted[i+1]-sorted[i])
}

// Ratio is a/b of two medians, NaN when either side was not measured or b
// is zero, so that a missing baseline never shows up as a ratio.
func Ratio(a, b Summary) float64 {
	if a.N == 0 || b.N == 0 || b.Median == 0 {
		return math.NaN()
	}
	return a.Median / b.Median
}
