package vm

import (
	"runtime"
	"testing"
)

func TestTSCKHzFromLog(t *testing.T) {
	tests := []struct {
		name, log string
		want      int
	}{
		{"none", "[    0.000000] Linux version 6.1.0\n", 0},
		{"detected", "[    0.000000] tsc: Fast TSC calibration failed\n[    0.000264] tsc: Detected 2096.017 MHz processor\n", 2096017},
		{"refined wins", "[    0.000264] tsc: Detected 2893.200 MHz processor\n[    1.472000] tsc: Refined TSC clocksource calibration: 2899.999 MHz\n", 2899999},
		{"syslog prefix", "<6>[    0.000264] tsc: Detected 3000.000 MHz processor\n", 3000000},
		{"garbage", "tsc: Detected lots of MHz processor\n", 0},
	}
	for _, tc := range tests {
		if got := tscKHzFromLog(tc.log); got != tc.want {
			t.Errorf("%s: got %d, want %d", tc.name, got, tc.want)
		}
	}
	if khz := HostTSCKHz(); runtime.GOARCH == "amd64" && khz <= 0 {
		t.Errorf("HostTSCKHz() = %d on this x86 host, want a rate", khz)
	}
}
