package main

import (
	"fmt"
	"image/color"
	"os"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/macvm/macvm/bench/internal/stats"
)

// The chart is the summary table drawn: one panel per headline metric,
// one bar per variant at its median, with a line over the min–max range
// of its samples, and the target as a dashed line where it is a
// bound on the figure itself or on the ratio to runc. It is written with
// gonum/plot (pure Go) next to the Markdown so the README can show it.

// chartColumns is how many panels go side by side.
const chartColumns = 3

// chartPalette colours the variants in order (runc first); colour-blind
// safe (Okabe-Ito).
var chartPalette = []color.RGBA{
	{0x55, 0x55, 0x55, 0xff}, // grey: runc
	{0x00, 0x72, 0xb2, 0xff}, // blue
	{0xe6, 0x9f, 0x00, 0xff}, // orange
	{0x00, 0x9e, 0x73, 0xff}, // green
	{0xcc, 0x79, 0xa7, 0xff}, // purple
	{0xd5, 0x5e, 0x00, 0xff}, // red
}

// writeChart renders r's headline metrics into a PNG at path. Metrics
// without samples are left out; it fails only if nothing can be drawn.
func writeChart(path string, r *Results) error {
	var panels []*plot.Plot
	for _, id := range headline {
		m := findMetric(r, id)
		if m == nil {
			continue
		}
		p, err := metricPanel(r, m)
		if err != nil {
			return fmt.Errorf("chart of %s: %w", id, err)
		}
		if p != nil {
			panels = append(panels, p)
		}
	}
	if len(panels) == 0 {
		return fmt.Errorf("chart: no metric with samples")
	}
	rows := (len(panels) + chartColumns - 1) / chartColumns
	grid := make([][]*plot.Plot, rows)
	for i := range grid {
		grid[i] = make([]*plot.Plot, chartColumns)
	}
	for i, p := range panels {
		grid[i/chartColumns][i%chartColumns] = p
	}

	const panelW, panelH = 5.2 * vg.Inch, 3.4 * vg.Inch
	const titleH = 0.5 * vg.Inch
	img := vgimg.NewWith(vgimg.UseWH(panelW*chartColumns, panelH*vg.Length(rows)+titleH), vgimg.UseDPI(96))
	dc := draw.New(img)
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())

	title := plot.New()
	title.Title.Text = chartTitle(r)
	title.Title.TextStyle.Font.Size = vg.Points(13)
	title.HideAxes()
	title.Draw(draw.Crop(dc, 0, 0, panelH*vg.Length(rows), 0))

	body := draw.Crop(dc, 0, 0, 0, -titleH)
	tiles := draw.Tiles{Rows: rows, Cols: chartColumns, PadX: vg.Millimeter * 2, PadY: vg.Millimeter * 2,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align(grid, tiles, body)
	for i := range grid {
		for j, p := range grid[i] {
			if p != nil {
				p.Draw(canvases[i][j])
			}
		}
	}

	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func chartTitle(r *Results) string {
	m := r.Machine
	return fmt.Sprintf("macvm vs runc, %s mode, %s: %d cores, %s, load %.1f (bar: median; line: min–max; dashed: issue-5 target)",
		r.Mode, m.Date.Format("2006-01-02 15:04 MST"), m.Cores, m.Accel, m.LoadStart)
}

func findMetric(r *Results, id string) *Metric {
	for _, m := range r.Metrics {
		if m.ID == id {
			return m
		}
	}
	return nil
}

// metricPanel draws one metric; nil when no variant has samples.
func metricPanel(r *Results, m *Metric) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = wrapTitle(plainTitle(m.Title), 48)
	p.Title.TextStyle.Font.Size = vg.Points(10)
	dir := "lower is better"
	if m.Higher {
		dir = "higher is better"
	}
	p.Y.Label.Text = m.Unit + ", " + dir
	p.Y.Min = 0
	p.Y.Tick.Label.Font.Size = vg.Points(8)
	p.X.Tick.Label.Font.Size = vg.Points(8)

	var names []string
	top := 0.0
	for i, v := range r.Variants {
		s := stats.Of(m.Samples[v.Name])
		if s.N == 0 {
			continue
		}
		x := float64(len(names))
		names = append(names, v.Name)
		bars, err := plotter.NewBarChart(plotter.Values{s.Median}, vg.Points(26))
		if err != nil {
			return nil, err
		}
		bars.XMin = x
		bars.Color = chartPalette[i%len(chartPalette)]
		bars.LineStyle.Width = 0
		p.Add(bars)
		if s.N > 1 {
			rng, err := plotter.NewLine(plotter.XYs{{X: x, Y: s.Min}, {X: x, Y: s.Max}})
			if err != nil {
				return nil, err
			}
			rng.Width = vg.Points(1.5)
			p.Add(rng)
		}
		top = max(top, s.Max)
	}
	if len(names) == 0 {
		return nil, nil
	}
	if t := targetValue(r, m); t > 0 {
		line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: t}, {X: float64(len(names)) - 0.5, Y: t}})
		if err != nil {
			return nil, err
		}
		line.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		line.Color = color.RGBA{0xd5, 0x00, 0x00, 0xff}
		p.Add(line)
		top = max(top, t)
	}
	p.Y.Max = top * 1.1
	p.NominalX(names...)
	p.X.Min, p.X.Max = -0.6, float64(len(names))-0.4
	return p, nil
}

// targetValue is the metric's target in its own unit: an absolute bound
// as is, a ratio bound times runc's median; 0 when there is none.
func targetValue(r *Results, m *Metric) float64 {
	if m.Target == nil {
		return 0
	}
	if !m.Target.Ratio {
		return m.Target.Value
	}
	base := stats.Of(m.Samples[baseline])
	if base.N == 0 {
		return 0
	}
	return m.Target.Value * base.Median
}

// plainTitle drops Markdown code marks, which a chart shows literally.
func plainTitle(s string) string { return strings.ReplaceAll(s, "`", "") }

// wrapTitle breaks s into lines of at most n bytes at spaces.
func wrapTitle(s string, n int) string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(s) {
		if line != "" && len(line)+1+len(w) > n {
			lines = append(lines, line)
			line = w
			continue
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	return strings.Join(append(lines, line), "\n")
}
