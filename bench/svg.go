package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// Minimal SVG charts: grouped bars and lines, enough for the report and
// free of dependencies.

var palette = []string{"#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"}

const (
	chartW, chartH                 = 860, 420
	padL, padR, padT, padB         = 70, 190, 40, 60
	plotW, plotH                   = chartW - padL - padR, chartH - padT - padB
	fontAttrs                      = `font-family="sans-serif" font-size="12"`
	noValue                float64 = -1
)

type svgDoc struct{ b strings.Builder }

func newSVG(title string) *svgDoc {
	d := &svgDoc{}
	fmt.Fprintf(&d.b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" %s>`+"\n", chartW, chartH, chartW, chartH, fontAttrs)
	fmt.Fprintf(&d.b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	d.text(chartW/2, 22, "middle", 15, title)
	return d
}

func (d *svgDoc) text(x, y float64, anchor string, size int, s string) {
	fmt.Fprintf(&d.b, `<text x="%.1f" y="%.1f" text-anchor="%s" font-size="%d">%s</text>`+"\n", x, y, anchor, size, html.EscapeString(s))
}

func (d *svgDoc) line(x1, y1, x2, y2 float64, color string, width float64, dash bool) {
	extra := ""
	if dash {
		extra = ` stroke-dasharray="4 3"`
	}
	fmt.Fprintf(&d.b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%.1f"%s/>`+"\n", x1, y1, x2, y2, color, width, extra)
}

func (d *svgDoc) legend(names, colors []string, dashed map[string]bool) {
	for i, n := range names {
		y := float64(padT + 10 + 18*i)
		x := float64(chartW - padR + 15)
		d.line(x, y-4, x+22, y-4, colors[i], 3, dashed[n])
		d.text(x+28, y, "start", 12, n)
	}
}

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

func (d *svgDoc) String() string { return d.b.String() + "</svg>\n" }

// axis maps values to pixels, linear or log10.
type axis struct {
	lo, hi float64
	log    bool
	px0    float64 // pixel of lo
	pxLen  float64 // signed pixel length to hi
}

func (a axis) px(v float64) float64 {
	if a.log {
		return a.px0 + (math.Log10(v)-math.Log10(a.lo))/(math.Log10(a.hi)-math.Log10(a.lo))*a.pxLen
	}
	return a.px0 + (v-a.lo)/(a.hi-a.lo)*a.pxLen
}

// ticks returns tick values: decades on a log axis, ~5 round steps otherwise.
func (a axis) ticks() []float64 {
	var out []float64
	if a.log {
		for e := math.Floor(math.Log10(a.lo)); e <= math.Ceil(math.Log10(a.hi)); e++ {
			if v := math.Pow(10, e); v >= a.lo*0.999 && v <= a.hi*1.001 {
				out = append(out, v)
			}
		}
		return out
	}
	step := niceStep((a.hi - a.lo) / 5)
	for v := math.Ceil(a.lo/step) * step; v <= a.hi+step/1e6; v += step {
		out = append(out, v)
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

func fmtTick(v float64) string {
	switch {
	case v >= 1e6 && math.Mod(v, 1e6) == 0:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3 && math.Mod(v, 1e3) == 0:
		return fmt.Sprintf("%gk", v/1e3)
	}
	return fmt.Sprintf("%g", math.Round(v*1000)/1000)
}

func (d *svgDoc) yAxis(a axis, label string) {
	for _, t := range a.ticks() {
		y := a.px(t)
		d.line(padL, y, padL+plotW, y, "#ddd", 1, false)
		d.text(padL-6, y+4, "end", 11, fmtTick(t))
	}
	d.line(padL, padT, padL, padT+plotH, "#333", 1, false)
	fmt.Fprintf(&d.b, `<text transform="translate(16,%d) rotate(-90)" text-anchor="middle">%s</text>`+"\n", padT+plotH/2, html.EscapeString(label))
}

func upperBound(vs ...float64) float64 {
	hi := 0.0
	for _, v := range vs {
		hi = math.Max(hi, v)
	}
	if hi <= 0 {
		return 1
	}
	return hi * 1.1
}

// bars draws groups of bars, one per series. val[s][g] is the bar height
// (noValue: no bar); lo/hi draw a whisker when given; mark a diamond.
type bars struct {
	title, ylabel   string
	groups, series  []string
	val, lo, hi, mk [][]float64
	refLine         float64 // drawn dashed when > 0
	colors          map[string]string
}

func (c bars) svg() string {
	d := newSVG(c.title)
	var all []float64
	for _, m := range [][][]float64{c.val, c.hi, c.mk} {
		for _, row := range m {
			all = append(all, row...)
		}
	}
	y := axis{lo: 0, hi: upperBound(append(all, c.refLine)...), px0: padT + plotH, pxLen: -plotH}
	d.yAxis(y, c.ylabel)
	if c.refLine > 0 {
		d.line(padL, y.px(c.refLine), padL+plotW, y.px(c.refLine), "#333", 1, true)
	}
	colors := seriesColors(c.series, c.colors)
	gw := float64(plotW) / float64(len(c.groups))
	bw := gw * 0.8 / float64(len(c.series))
	for g, name := range c.groups {
		x0 := padL + float64(g)*gw + gw*0.1
		d.text(padL+float64(g)*gw+gw/2, padT+plotH+18, "middle", 12, name)
		for s := range c.series {
			v := c.val[s][g]
			if v == noValue {
				continue
			}
			x := x0 + float64(s)*bw
			fmt.Fprintf(&d.b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n",
				x, y.px(v), bw*0.9, y.px(0)-y.px(v), colors[s])
			cx := x + bw*0.45
			if c.lo != nil && c.hi != nil {
				d.line(cx, y.px(c.lo[s][g]), cx, y.px(c.hi[s][g]), "#222", 1.2, false)
			}
			if c.mk != nil && c.mk[s][g] != noValue {
				my := y.px(c.mk[s][g])
				fmt.Fprintf(&d.b, `<path d="M%.1f %.1f l4 4 l-4 4 l-4 -4 z" fill="#222"/>`+"\n", cx, my-4)
			}
		}
	}
	d.legend(c.series, colors, nil)
	return d.String()
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
	d := newSVG(c.title)
	xlo, xhi, ylo, yhi := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range c.series {
		for _, p := range s.points {
			xlo, xhi = math.Min(xlo, p.x), math.Max(xhi, p.x)
			ylo, yhi = math.Min(ylo, p.y), math.Max(yhi, p.y)
		}
	}
	if math.IsInf(xlo, 0) {
		return d.String()
	}
	if !c.logY {
		ylo, yhi = math.Min(0, ylo*1.1), upperBound(yhi)
	} else {
		ylo, yhi = math.Pow(10, math.Floor(math.Log10(ylo))), math.Pow(10, math.Ceil(math.Log10(yhi)))
	}
	if xhi == xlo {
		xhi = xlo * 10
	}
	x := axis{lo: xlo, hi: xhi, log: c.logX, px0: padL + 10, pxLen: plotW - 20}
	y := axis{lo: ylo, hi: yhi, log: c.logY, px0: padT + plotH, pxLen: -plotH}
	d.yAxis(y, c.ylabel)
	for _, t := range x.ticks() {
		d.text(x.px(t), padT+plotH+18, "middle", 11, fmtTick(t))
	}
	d.line(padL, padT+plotH, padL+plotW, padT+plotH, "#333", 1, false)
	d.text(padL+plotW/2, chartH-15, "middle", 12, c.xlabel)
	names := make([]string, len(c.series))
	dashed := map[string]bool{}
	for i, s := range c.series {
		names[i], dashed[s.name] = s.name, s.dashed
	}
	colors := seriesColors(names, c.colors)
	for i, s := range c.series {
		var path strings.Builder
		for j, p := range s.points {
			cmd := "L"
			if j == 0 {
				cmd = "M"
			}
			fmt.Fprintf(&path, "%s%.1f %.1f ", cmd, x.px(p.x), y.px(p.y))
			fmt.Fprintf(&d.b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", x.px(p.x), y.px(p.y), colors[i])
		}
		dash := ""
		if s.dashed {
			dash = ` stroke-dasharray="6 4"`
		}
		fmt.Fprintf(&d.b, `<path d="%s" fill="none" stroke="%s" stroke-width="2"%s/>`+"\n", path.String(), colors[i], dash)
	}
	d.legend(names, colors, dashed)
	return d.String()
}
