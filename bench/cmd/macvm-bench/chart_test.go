package main

import (
	"image/color"
	"image/png"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestWriteChart(t *testing.T) {
	r := &Results{
		Machine:  Machine{Date: time.Date(2026, 11, 29, 1, 0, 0, 0, time.UTC), Cores: 2, Accel: "TCG", LoadStart: 3},
		Mode:     "quick",
		Variants: []VariantInfo{{Name: "runc"}, {Name: "macvm"}, {Name: "macvm-template"}},
	}
	wall := r.metric("run.wall", GroupLatency, "`ctr run --rm` of `true` (wall)", "s", ratioMax(2.5))
	for _, x := range []float64{0.5, 0.6, 0.55} {
		wall.add("runc", x)
		wall.add("macvm", 6*x)
		wall.add("macvm-template", 2*x)
	}
	rss := r.metric("mem.hv_rss", GroupMemory, "hypervisor (qemu) RSS", "MiB", vmOnly, absMax(133.5))
	rss.add("macvm", 245)
	rss.add("macvm-template", 80)
	r.metric("mem.guest_used", GroupMemory, "guest used", "MiB", vmOnly) // no samples: no panel

	path := filepath.Join(t.TempDir(), "c.png")
	if err := writeChart(path, r); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	if b := img.Bounds(); b.Dx() < 600 || b.Dy() < 300 {
		t.Fatalf("chart is %v", b)
	}
	// Every variant's bar is drawn in its colour.
	seen := map[color.RGBA]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y += 2 {
		for x := b.Min.X; x < b.Max.X; x += 2 {
			r, g, bl, a := img.At(x, y).RGBA()
			seen[color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(bl >> 8), uint8(a >> 8)}] = true
		}
	}
	for i, v := range r.Variants {
		if !seen[chartPalette[i]] {
			t.Errorf("no bar of %s (colour %v) in the chart", v.Name, chartPalette[i])
		}
	}
}

func TestWriteChartNothingToDraw(t *testing.T) {
	r := &Results{Variants: []VariantInfo{{Name: "runc"}}}
	r.metric("run.wall", GroupLatency, "wall", "s")
	if err := writeChart(filepath.Join(t.TempDir(), "c.png"), r); err == nil {
		t.Fatal("a chart without samples was drawn")
	}
}

func TestWrapTitle(t *testing.T) {
	if got := wrapTitle("aaa bbb ccc", 7); got != "aaa bbb\nccc" {
		t.Errorf("got %q", got)
	}
}
