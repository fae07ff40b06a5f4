package main

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestCheck runs the real tool (go list + go/types) on the testdata
// packages for both darwin architectures: wrong vz calls must be caught
// with the right line and message, correct code must pass, and an
// arm64-only API must fail only on amd64.
func TestCheck(t *testing.T) {
	tests := []struct {
		pkg  string
		arch string
		want []string // substrings, one per expected error, in sorted order
	}{
		{"./testdata/goodvz", "arm64", nil},
		{"./testdata/goodvz", "amd64", nil},
		{"./testdata/wrongvz", "arm64", []string{
			"testdata/wrongvz/vm_darwin.go:16:54: cannot use cpus (variable of type int) as uint value",
			"testdata/wrongvz/vm_darwin.go:24:50: cannot use []*vz.VirtioSocketDeviceConfiguration{…}",
		}},
		{"./testdata/wrongvz", "amd64", []string{
			"testdata/wrongvz/vm_darwin.go:16:54: cannot use cpus",
			"testdata/wrongvz/vm_darwin.go:24:50: cannot use []*vz.VirtioSocketDeviceConfiguration{…}",
		}},
		{"./testdata/rosetta", "arm64", nil},
		{"./testdata/rosetta", "amd64", []string{
			"testdata/rosetta/rosetta_darwin.go:11:12: undefined: vz.LinuxRosettaDirectoryShareAvailability",
			"testdata/rosetta/rosetta_darwin.go:11:59: undefined: vz.LinuxRosettaAvailabilityInstalled",
		}},
	}
	for _, tt := range tests {
		t.Run(strings.TrimPrefix(tt.pkg, "./testdata/")+"/"+tt.arch, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			res, err := Check(ctx, Options{Dir: ".", GOARCH: tt.arch, Patterns: []string{tt.pkg}})
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if res.Checked != 1 {
				t.Errorf("checked %d packages of this module, want 1", res.Checked)
			}
			// The vz package and its dependencies must have been loaded
			// from source, or the check proves nothing.
			if res.Graph < 10 {
				t.Errorf("graph has %d packages, want vz and its dependencies", res.Graph)
			}
			if len(res.Errors) != len(tt.want) {
				t.Fatalf("got %d errors, want %d:\n%s", len(res.Errors), len(tt.want), strings.Join(res.Errors, "\n"))
			}
			for i, w := range tt.want {
				if !strings.Contains(res.Errors[i], w) {
					t.Errorf("error %d:\n got %s\nwant it to contain %s", i, res.Errors[i], w)
				}
			}
		})
	}
}

// TestCheckListError reports a package go list cannot load as an error of
// this module rather than passing silently.
func TestCheckListError(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res, err := Check(ctx, Options{Dir: ".", GOARCH: "arm64", Patterns: []string{"./testdata/nosuchpkg"}})
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if len(res.Errors) != 1 || !strings.Contains(res.Errors[0], "nosuchpkg") {
		t.Fatalf("got %q, want one error naming the missing package", res.Errors)
	}
}
