package main

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"html/template"
	"image/color"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	"github.com/migvisor/migvisor/migration/controller"
)

// writeReport writes summary.json, samples.csv, one SVG per chart and an index.html that
// holds the summary and the charts inline (it needs no network and no other file).
func writeReport(dir string, sum *controller.Summary) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(sum, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "summary.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	if err := writeSamplesCSV(filepath.Join(dir, "samples.csv"), sum.Samples); err != nil {
		return err
	}
	var charts []chart
	for _, c := range chartsOf(sum) {
		svg, err := c.render(sum.Passes)
		if err != nil {
			return fmt.Errorf("chart %s: %w", c.file, err)
		}
		if err := os.WriteFile(filepath.Join(dir, c.file), svg, 0o644); err != nil {
			return err
		}
		c.SVG = template.HTML(inlineSVG(svg))
		charts = append(charts, c)
	}
	var page bytes.Buffer
	if err := indexTemplate.Execute(&page, map[string]any{"S": sum, "Summary": string(b), "Charts": charts}); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "index.html"), page.Bytes(), 0o644)
}

func writeSamplesCSV(file string, samples []controller.Sample) error {
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	w := csv.NewWriter(f)
	w.Write([]string{"elapsed-ms", "status", "dirty-sync-count", "transferred", "remaining", "total", "mbps",
		"dirty-pages-rate", "expected-downtime", "cpu-throttle-percentage", "limit-total-mbs"})
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	i := func(v int64) string { return strconv.FormatInt(v, 10) }
	for _, s := range samples {
		w.Write([]string{i(s.Elapsed.Milliseconds()), s.Status, i(s.RAM.DirtySyncCount), u(s.RAM.Transferred),
			u(s.RAM.Remaining), u(s.RAM.Total), strconv.FormatFloat(s.RAM.Mbps, 'f', 3, 64), u(s.RAM.DirtyPagesRate),
			i(s.ExpectedDowntime), i(s.CPUThrottlePercentage), u(s.LimitTotal)})
	}
	w.Flush()
	if err := w.Error(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

type series struct {
	name string
	pts  plotter.XYs
}

type chart struct {
	file, title, ylabel string
	lines               []series
	SVG                 template.HTML
}

func chartsOf(sum *controller.Summary) []chart {
	const mib = 1 << 20
	secs := func(d time.Duration) float64 { return d.Seconds() }
	var rem, sent, rate, dirty, limit, throttle plotter.XYs
	vcpus := map[int]plotter.XYs{}
	first := map[int]uint64{}
	for _, s := range sum.Samples {
		x := secs(s.Elapsed)
		rem = append(rem, plotter.XY{X: x, Y: float64(s.RAM.Remaining) / mib})
		sent = append(sent, plotter.XY{X: x, Y: float64(s.RAM.Transferred) / mib})
		rate = append(rate, plotter.XY{X: x, Y: s.RAM.Mbps * 1e6 / 8 / mib})
		dirty = append(dirty, plotter.XY{X: x, Y: float64(s.RAM.DirtyPagesRate*max(s.RAM.PageSize, 4096)) / mib})
		limit = append(limit, plotter.XY{X: x, Y: float64(s.LimitTotal)})
		throttle = append(throttle, plotter.XY{X: x, Y: float64(s.CPUThrottlePercentage)})
		for _, w := range s.Workload {
			if _, ok := first[w.CPU]; !ok {
				first[w.CPU] = w.Pages
			}
			vcpus[w.CPU] = append(vcpus[w.CPU], plotter.XY{X: x, Y: float64(w.Pages - first[w.CPU])})
		}
	}
	out := []chart{
		{file: "bytes.svg", title: "Remaining and transferred", ylabel: "MiB", lines: []series{{"remaining", rem}, {"transferred", sent}}},
		{file: "rates.svg", title: "Transfer rate and dirty rate", ylabel: "MiB/s", lines: []series{{"transfer rate", rate}, {"dirty rate", dirty}}},
		{file: "throttle.svg", title: "Applied dirty limit (MB/s, all vCPUs) and CPU throttle (%)", ylabel: "MB/s or %",
			lines: []series{{"dirty limit", limit}, {"cpu throttle", throttle}}},
	}
	if len(vcpus) > 0 {
		c := chart{file: "vcpus.svg", title: "Guest progress per vCPU (x-query-workload)", ylabel: "pages touched since migrate"}
		for cpu := 0; cpu < len(vcpus)+8 && len(c.lines) < len(vcpus); cpu++ {
			if pts, ok := vcpus[cpu]; ok {
				c.lines = append(c.lines, series{fmt.Sprintf("vCPU %d", cpu), pts})
			}
		}
		out = append(out, c)
	}
	return out
}

var palette = []color.Color{color.RGBA{0x1f, 0x77, 0xb4, 255}, color.RGBA{0xd6, 0x27, 0x28, 255},
	color.RGBA{0x2c, 0xa0, 0x2c, 255}, color.RGBA{0x94, 0x67, 0xbd, 255}}

// render draws the chart as SVG, a dashed grey line at each MIGRATION_PASS.
func (c chart) render(passes []controller.Pass) ([]byte, error) {
	p := plot.New()
	p.Title.Text = c.title
	p.X.Label.Text = "seconds since migrate"
	p.Y.Label.Text = c.ylabel
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	ymax := 1.0
	for i, s := range c.lines {
		if len(s.pts) == 0 {
			continue
		}
		l, err := plotter.NewLine(s.pts)
		if err != nil {
			return nil, err
		}
		l.Color = palette[i%len(palette)]
		l.Width = vg.Points(1.5)
		p.Add(l)
		p.Legend.Add(s.name, l)
		for _, pt := range s.pts {
			ymax = max(ymax, pt.Y)
		}
	}
	for _, ps := range passes {
		x := ps.Elapsed.Seconds()
		l, err := plotter.NewLine(plotter.XYs{{X: x, Y: 0}, {X: x, Y: ymax}})
		if err != nil {
			return nil, err
		}
		l.Color = color.Gray{0xa0}
		l.Dashes = []vg.Length{vg.Points(3), vg.Points(3)}
		p.Add(l)
	}
	if len(passes) > 0 {
		l, _ := plotter.NewLine(plotter.XYs{})
		l.Color, l.Dashes = color.Gray{0xa0}, []vg.Length{vg.Points(3), vg.Points(3)}
		p.Legend.Add("pass", l)
	}
	p.Y.Min = 0
	w, err := p.WriterTo(9*vg.Inch, 3.6*vg.Inch, "svg")
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

var indexTemplate = template.Must(template.New("index").Parse(`<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>migctl migrate: {{.S.Status}}</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.chart{margin:1em 0}.chart svg{width:100%;height:auto}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
.completed{color:#2a7d2a}.failed,.cancelled{color:#b22}
</style></head><body>
<h1>Migration <span class="{{.S.Status}}">{{if .S.Status}}{{.S.Status}}{{else}}not run{{end}}</span></h1>
<table>
<tr><th>total-time</th><td>{{.S.TotalTime}} ms</td><th>downtime</th><td>{{.S.Downtime}} ms</td><th>setup-time</th><td>{{.S.SetupTime}} ms</td></tr>
<tr><th>transferred</th><td>{{.S.Transferred}} bytes</td><th>passes</th><td>{{.S.DirtySyncCount}}</td><th>policy</th><td>{{.S.Policy}}</td></tr>
{{with .S.Plan}}<tr><th>plan</th><td colspan="5"><b>{{.Strategy}}</b>: {{.Reason}}</td></tr>{{end}}
{{with .S.DirtyRateBefore}}<tr><th>dirty rate before</th><td colspan="5">{{.Total}} MB/s ({{.Mode}}){{range .VCPU}}; vCPU {{.CPU}}: {{.Rate}}{{end}}</td></tr>{{end}}
{{with .S.DirtyRateAfter}}<tr><th>dirty rate after</th><td colspan="5">{{.Total}} MB/s ({{.Mode}}){{range .VCPU}}; vCPU {{.CPU}}: {{.Rate}}{{end}}</td></tr>{{end}}
{{with .S.Reason}}<tr><th>why</th><td colspan="5">{{.}}</td></tr>{{end}}
</table>
{{range .Charts}}<div class="chart">{{.SVG}}</div>{{end}}
<h2>Actions</h2>
<table><tr><th>time (UTC)</th><th>+s</th><th>end</th><th>action</th><th>reason</th></tr>
{{range .S.Actions}}<tr><td>{{.Time.UTC.Format "15:04:05.000"}}</td><td>{{printf "%.3f" .Elapsed.Seconds}}</td><td>{{.Target}}</td><td>{{.Kind}}</td><td>{{.Reason}}{{with .Error}} <b>error: {{.}}</b>{{end}}</td></tr>
{{end}}</table>
<h2>summary.json</h2><pre>{{.Summary}}</pre>
</body></html>
`))

// inlineSVG drops the XML declaration, which has no place inside HTML.
func inlineSVG(svg []byte) []byte {
	if i := bytes.Index(svg, []byte("<svg")); i > 0 {
		return svg[i:]
	}
	return svg
}
