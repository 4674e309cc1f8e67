package main

import (
	"bytes"
	"image/color"
	"math"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// The report's charts, grouped bars and lines, drawn by gonum/plot as SVG.

var palette = []string{"#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"}

const (
	chartW, chartH         = 860, 420 // in points
	noValue        float64 = -1
)

// seriesColors gives each name its color in fixed (by name, when given
// there), so that one variant looks the same in every chart.
func seriesColors(names []string, fixed map[string]string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		if c, ok := fixed[n]; ok {
			out[i] = c
		} else {
			out[i] = palette[i%len(palette)]
		}
	}
	return out
}

// rgb parses "#rrggbb".
func rgb(hex string) color.Color {
	var c color.RGBA
	c.A = 0xff
	if len(hex) == 7 && hex[0] == '#' {
		v := 0
		for _, ch := range hex[1:] {
			v <<= 4
			switch {
			case ch >= '0' && ch <= '9':
				v |= int(ch - '0')
			case ch >= 'a' && ch <= 'f':
				v |= int(ch-'a') + 10
			case ch >= 'A' && ch <= 'F':
				v |= int(ch-'A') + 10
			}
		}
		c.R, c.G, c.B = uint8(v>>16), uint8(v>>8), uint8(v)
	}
	return c
}

func fmtTick(v float64) string {
	switch {
	case v >= 1e6 && math.Mod(v, 1e6) == 0:
		return trimFloat(v/1e6) + "M"
	case v >= 1e3 && math.Mod(v, 1e3) == 0:
		return trimFloat(v/1e3) + "k"
	}
	return trimFloat(math.Round(v*1000) / 1000)
}

func trimFloat(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }

// ticks labels another Ticker's ticks with fmtTick (10k, 1M).
type ticks struct{ plot.Ticker }

func (t ticks) Ticks(lo, hi float64) []plot.Tick {
	out := t.Ticker.Ticks(lo, hi)
	for i := range out {
		if out[i].Label != "" {
			out[i].Label = fmtTick(out[i].Value)
		}
	}
	return out
}

func init() {
	sans := font.Font{Typeface: "Liberation", Variant: "Sans"}
	plot.DefaultFont, plotter.DefaultFont = sans, sans
}

// roundTicks are about five ticks at round steps (1, 2, 2.5, 5 times a
// power of ten): gonum's default gives two or three on these ranges.
type roundTicks struct{}

func (roundTicks) Ticks(lo, hi float64) []plot.Tick {
	step := niceStep((hi - lo) / 5)
	var out []plot.Tick
	for v := math.Ceil(lo/step) * step; v <= hi+step/1e6; v += step {
		out = append(out, plot.Tick{Value: v, Label: fmtTick(v)})
	}
	return out
}

func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func newPlot(title, xlabel, ylabel string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.Title.Padding = vg.Points(10)
	p.X.Label.Text = xlabel
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	return p
}

func render(p *plot.Plot) string {
	w, err := p.WriterTo(chartW, chartH, "svg")
	if err != nil {
		return ""
	}
	var b bytes.Buffer
	if _, err := w.WriteTo(&b); err != nil {
		return ""
	}
	return b.String()
}

// bars draws groups of bars, one per series. val[s][g] is the bar height
// (noValue: no bar); lo/hi draw a whisker when given; mk a diamond.
type bars struct {
	title, ylabel   string
	groups, series  []string
	val, lo, hi, mk [][]float64
	refLine         float64 // drawn dashed when > 0
	colors          map[string]string
}

func (c bars) svg() string {
	p := newPlot(c.title, "", c.ylabel)
	p.Y.Min = 0
	p.Y.Tick.Marker = roundTicks{}
	p.NominalX(c.groups...)
	colors := seriesColors(c.series, c.colors)
	// 80% of a group's width is its bars, one per series.
	gw := vg.Length(chartW-150) / vg.Length(max(len(c.groups), 1))
	bw := gw * 0.8 / vg.Length(max(len(c.series), 1))
	for s, name := range c.series {
		vals := make(plotter.Values, len(c.groups))
		for g := range c.groups {
			if v := c.val[s][g]; v != noValue {
				vals[g] = v
			}
		}
		b, err := plotter.NewBarChart(vals, bw*0.9)
		if err != nil {
			continue
		}
		b.Color, b.LineStyle.Width = rgb(colors[s]), 0
		b.Offset = (vg.Length(s) - vg.Length(len(c.series)-1)/2) * bw
		p.Add(b)
		p.Legend.Add(name, b)
		m := marks{offset: b.Offset}
		for g := range c.groups {
			if c.val[s][g] == noValue {
				continue
			}
			if c.lo != nil && c.hi != nil {
				m.whiskers = append(m.whiskers, [3]float64{float64(g), c.lo[s][g], c.hi[s][g]})
			}
			if c.mk != nil && c.mk[s][g] != noValue {
				m.diamonds = append(m.diamonds, plotter.XY{X: float64(g), Y: c.mk[s][g]})
			}
		}
		p.Add(m)
	}
	if c.refLine > 0 {
		ref := plotter.NewFunction(func(float64) float64 { return c.refLine })
		ref.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		ref.Color = rgb("#333333")
		p.Add(ref)
	}
	p.X.Min, p.X.Max = -0.5, float64(len(c.groups))-0.5
	p.Y.Max = legendRoom(p.Y.Max, len(c.series))
	return render(p)
}

// legendRoom is a y range's top with room above the data for the legend,
// which gonum/plot draws inside the plot: n entries of about 4% each.
func legendRoom(top float64, n int) float64 {
	return top * (1.1 + 0.045*float64(n))
}

// marks are a bar series' whiskers (x, lo, hi) and diamonds, drawn at the
// bars' offset from their group's center.
type marks struct {
	offset   vg.Length
	whiskers [][3]float64
	diamonds []plotter.XY
}

func (m marks) Plot(c draw.Canvas, p *plot.Plot) {
	trX, trY := p.Transforms(&c)
	ink := draw.LineStyle{Color: rgb("#222222"), Width: vg.Points(1.2)}
	for _, w := range m.whiskers {
		x := trX(w[0]) + m.offset
		c.StrokeLine2(ink, x, trY(w[1]), x, trY(w[2]))
	}
	for _, d := range m.diamonds {
		x, y := trX(d.X)+m.offset, trY(d.Y)
		var path vg.Path
		path.Move(vg.Point{X: x, Y: y + 4})
		path.Line(vg.Point{X: x + 4, Y: y})
		path.Line(vg.Point{X: x, Y: y - 4})
		path.Line(vg.Point{X: x - 4, Y: y})
		path.Close()
		c.SetColor(ink.Color)
		c.Fill(path)
	}
}

// DataRange makes the whiskers' and diamonds' tops part of the y range.
func (m marks) DataRange() (xmin, xmax, ymin, ymax float64) {
	xmin, xmax, ymin, ymax = math.Inf(1), math.Inf(-1), 0, math.Inf(-1)
	for _, w := range m.whiskers {
		xmin, xmax, ymax = math.Min(xmin, w[0]), math.Max(xmax, w[0]), math.Max(ymax, w[2])
	}
	for _, d := range m.diamonds {
		xmin, xmax, ymax = math.Min(xmin, d.X), math.Max(xmax, d.X), math.Max(ymax, d.Y)
	}
	if math.IsInf(xmin, 1) {
		return 0, 0, 0, 0
	}
	return xmin, xmax, ymin, ymax
}

type linePoint struct{ x, y float64 }

type lineSeries struct {
	name   string
	points []linePoint
	dashed bool
}

type lines struct {
	title, xlabel, ylabel string
	logX, logY            bool
	series                []lineSeries
	colors                map[string]string
}

func (c lines) svg() string {
	p := newPlot(c.title, c.xlabel, c.ylabel)
	p.X.Tick.Marker, p.Y.Tick.Marker = roundTicks{}, roundTicks{}
	if c.logX {
		p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, ticks{plot.LogTicks{Prec: -1}}
	}
	if c.logY {
		p.Y.Scale, p.Y.Tick.Marker = plot.LogScale{}, ticks{plot.LogTicks{Prec: -1}}
	} else {
		p.Y.Min = 0
	}
	names := make([]string, len(c.series))
	for i, s := range c.series {
		names[i] = s.name
	}
	colors := seriesColors(names, c.colors)
	for i, s := range c.series {
		xys := make(plotter.XYs, len(s.points))
		for j, pt := range s.points {
			xys[j] = plotter.XY{X: pt.x, Y: pt.y}
		}
		l, pts, err := plotter.NewLinePoints(xys)
		if err != nil {
			continue
		}
		col := rgb(colors[i])
		l.Color, l.Width = col, vg.Points(2)
		if s.dashed {
			l.Dashes = []vg.Length{vg.Points(6), vg.Points(4)}
		}
		pts.Color, pts.Shape, pts.Radius = col, draw.CircleGlyph{}, vg.Points(3)
		p.Add(l, pts)
		p.Legend.Add(s.name, l)
	}
	if c.logY {
		p.Y.Min, p.Y.Max = math.Pow(10, math.Floor(math.Log10(p.Y.Min))), math.Pow(10, math.Ceil(math.Log10(p.Y.Max))+1)
	} else {
		p.Y.Max = legendRoom(p.Y.Max, len(c.series))
	}
	return render(p)
}
