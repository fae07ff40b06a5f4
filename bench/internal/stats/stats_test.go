package stats

import (
	"math"
	"testing"
	"time"
)

func TestOf(t *testing.T) {
	for _, tc := range []struct {
		name                       string
		in                         []float64
		median, min, max, p25, p75 float64
	}{
		{"odd", []float64{5, 1, 3}, 3, 1, 5, 2, 4},
		{"even", []float64{4, 1, 3, 2}, 2.5, 1, 4, 1.75, 3.25},
		{"one", []float64{7}, 7, 7, 7, 7, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Of(tc.in)
			got := []float64{s.Median, s.Min, s.Max, s.P25, s.P75}
			want := []float64{tc.median, tc.min, tc.max, tc.p25, tc.p75}
			for i := range got {
				if math.Abs(got[i]-want[i]) > 1e-12 {
					t.Errorf("Of(%v) = median/min/max/p25/p75 %v, want %v", tc.in, got, want)
					break
				}
			}
			if s.N != len(tc.in) {
				t.Errorf("N = %d, want %d", s.N, len(tc.in))
			}
		})
	}
}

func TestOfDoesNotReorderInput(t *testing.T) {
	in := []float64{3, 1, 2}
	Of(in)
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Errorf("input reordered: %v", in)
	}
}

func TestEmptyAndRatio(t *testing.T) {
	if s := Of(nil); s.N != 0 {
		t.Errorf("Of(nil).N = %d, want 0", s.N)
	}
	a, b := Of([]float64{2, 4, 6}), Of([]float64{1, 2, 3})
	if got := Ratio(a, b); got != 2 {
		t.Errorf("Ratio = %v, want 2", got)
	}
	if got := Ratio(a, Summary{}); !math.IsNaN(got) {
		t.Errorf("Ratio against an unmeasured baseline = %v, want NaN", got)
	}
	if got := Ratio(a, Of([]float64{0})); !math.IsNaN(got) {
		t.Errorf("Ratio against a zero median = %v, want NaN", got)
	}
}

func TestDurations(t *testing.T) {
	s := Durations([]time.Duration{time.Second, 3 * time.Second, 2 * time.Second})
	if s.Median != 2 || s.RelativeSpreadIQR != 0.5 {
		t.Errorf("Durations: median %v spread %v, want 2 and 0.5", s.Median, s.RelativeSpreadIQR)
	}
}
