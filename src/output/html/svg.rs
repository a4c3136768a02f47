//! The charts: inline SVG, drawn here (histograms, bars by error kind, series over time).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::tally::Col;
use super::text::{escape, group, short, usd, usd_tick};
use crate::ledger::record::format_timestamp;

/// Bars in a histogram, about.
const HIST_BINS: u64 = 30;

const W: f64 = 640.0;
const H: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 36.0;

fn svg_open(o: &mut String, label: &str) {
    svg_open_high(o, label, H);
}

fn svg_open_high(o: &mut String, label: &str, h: f64) {
    let _ = write!(
        o,
        "<svg viewBox=\"0 0 {W} {h}\" role=\"img\" aria-label=\"{}\">",
        escape(label)
    );
}

pub(crate) fn empty_svg(text: &str) -> String {
    let mut o = String::new();
    svg_open(&mut o, text);
    let _ = write!(
        o,
        "<text x=\"{}\" y=\"{}\" class=\"empty\" text-anchor=\"middle\">{}</text></svg>",
        W / 2.0,
        H / 2.0,
        escape(text)
    );
    o
}

/// The 1-2-5 step at or above `x`.
fn nice_step(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

/// Horizontal grid lines and labels for 0..=max; returns the axis top.
fn y_axis(o: &mut String, max: f64, fmt: &dyn Fn(f64) -> String) -> f64 {
    let step = nice_step(max / 4.0);
    let top = (max / step).ceil().max(1.0) * step;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let y = TOP + (H - TOP - BOTTOM) * (1.0 - v / top);
        let _ = write!(
            o,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            escape(&fmt(v))
        );
        v += step;
    }
    top
}

/// One histogram bar: `[lo, hi)`, or everything from `lo` up when `open`.
#[derive(Debug, Clone, PartialEq)]
struct Bin {
    lo: u64,
    hi: u64,
    count: u64,
    open: bool,
}

/// Linear bins of a 1-2-5 width over the recorded range; a long tail (max above twice the
/// 99th percentile) goes into one last open bin, so a few outliers do not squash the rest.
fn linear_bins(h: &Histogram<u64>) -> Vec<Bin> {
    if h.is_empty() {
        return Vec::new();
    }
    let (min, max) = (h.min(), h.max());
    let p99 = h.value_at_quantile(0.99);
    let hi = if max > p99.saturating_mul(2) && p99 > min {
        p99
    } else {
        max
    };
    let step = nice_step((hi - min) as f64 / HIST_BINS as f64).max(1.0) as u64;
    let start = min / step * step;
    let n = ((hi - start) / step + 1) as usize;
    let mut bins: Vec<Bin> = (0..n as u64)
        .map(|i| Bin {
            lo: start + i * step,
            hi: start + (i + 1) * step,
            count: 0,
            open: false,
        })
        .collect();
    if hi < max {
        bins.push(Bin {
            lo: start + n as u64 * step,
            hi: max,
            count: 0,
            open: true,
        });
    }
    for v in h.iter_recorded() {
        // The bucket's value, held within what was recorded (hdrhistogram rounds up).
        let x = h.median_equivalent(v.value_iterated_to()).clamp(min, max);
        let i = (((x - start) / step) as usize).min(bins.len() - 1);
        bins[i].count += v.count_at_value();
    }
    bins
}

pub(crate) fn histogram_svg(h: &Histogram<u64>, unit: &str, what: &str) -> String {
    let bins = linear_bins(h);
    if bins.is_empty() {
        return empty_svg("no rows");
    }
    let mut o = String::with_capacity(8 * 1024);
    svg_open(&mut o, &format!("histogram of {unit}"));
    let max = bins.iter().map(|b| b.count).max().unwrap_or(1) as f64;
    let top = y_axis(&mut o, max, &short);
    let plot_w = W - LEFT - RIGHT;
    let bw = plot_w / bins.len() as f64;
    let base = H - BOTTOM;
    for (i, b) in bins.iter().enumerate() {
        let x = LEFT + i as f64 * bw;
        let hgt = (H - TOP - BOTTOM) * b.count as f64 / top;
        let range = if b.open {
            format!("{} {unit} and more", group(b.lo))
        } else if b.hi - b.lo == 1 {
            format!("{} {unit}", group(b.lo))
        } else {
            format!("{}–{} {unit}", group(b.lo), group(b.hi - 1))
        };
        let _ = write!(
            o,
            "<rect class=\"bar{}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{range}: {} {what}</title></rect>",
            if b.open { " tail" } else { "" },
            x + 0.5,
            base - hgt,
            (bw - 1.0).max(0.5),
            hgt,
            group(b.count)
        );
    }
    // About five labels along the bottom, at bin edges.
    let every = bins.len().div_ceil(5).max(1);
    for (i, b) in bins.iter().enumerate() {
        if i % every == 0 || (b.open && i == bins.len() - 1) {
            let label = if b.open {
                format!("≥{}", short(b.lo as f64))
            } else {
                short(b.lo as f64)
            };
            let _ = write!(
                o,
                "<text class=\"tick\" x=\"{:.1}\" y=\"{}\" text-anchor=\"start\">{}</text>",
                LEFT + i as f64 * bw,
                H - BOTTOM + 14.0,
                escape(&label)
            );
        }
    }
    let _ = write!(
        o,
        "<text class=\"axis\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text></svg>",
        W - RIGHT,
        H - 4.0,
        escape(unit)
    );
    o
}

/// Horizontal bars, one per label (errors by kind).
pub(crate) fn hbars_svg(items: &[(String, u64)]) -> String {
    if items.is_empty() {
        return empty_svg("no failed rows");
    }
    let shown = &items[..items.len().min(12)];
    let row_h = 26.0;
    let more = items.len() > shown.len();
    let h = TOP + row_h * shown.len() as f64 + if more { 24.0 } else { 4.0 };
    let max = shown.iter().map(|i| i.1).max().unwrap_or(1) as f64;
    let label_w = 200.0;
    let mut o = String::with_capacity(4096);
    svg_open_high(&mut o, "failed rows by error kind", h);
    for (i, (label, n)) in shown.iter().enumerate() {
        let y = TOP + i as f64 * row_h;
        let w = (W - label_w - 80.0) * *n as f64 / max;
        let _ = write!(
            o,
            "<text class=\"tick\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect class=\"bar err\" x=\"{label_w}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{}: {} rows</title></rect>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            label_w - 8.0,
            y + row_h * 0.65,
            escape(label),
            y + row_h * 0.15,
            w.max(1.0),
            row_h * 0.7,
            escape(label),
            group(*n),
            label_w + w.max(1.0) + 6.0,
            y + row_h * 0.65,
            group(*n)
        );
    }
    if items.len() > shown.len() {
        let _ = write!(
            o,
            "<text class=\"tick\" x=\"{label_w}\" y=\"{}\">and {} more kinds</text>",
            h - 6.0,
            items.len() - shown.len()
        );
    }
    o.push_str("</svg>");
    o
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Series {
    CumulativeCost,
    RequestsPerMinute,
}

/// The time of day, to the second when the columns are shorter than a minute.
fn clock(ms: i64, col_minutes: f64) -> String {
    let t = format_timestamp(ms);
    if col_minutes < 1.0 {
        t[11..19].to_string()
    } else {
        t[11..16].to_string()
    }
}

fn day(ms: i64) -> String {
    format_timestamp(ms)[..10].to_string()
}

/// A length of time, in its largest whole unit: "10 s", "2 min", "6 h", "3 d".
pub(crate) fn gap_text(ms: i64) -> String {
    let s = ms / 1000;
    if s >= 2 * 86_400 || (s >= 86_400 && s % 86_400 == 0) {
        format!("{} d", s / 86_400)
    } else if s >= 2 * 3600 || (s >= 3600 && s % 3600 == 0) {
        format!("{} h", s / 3600)
    } else if s >= 120 || (s >= 60 && s % 60 == 0) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

pub(crate) fn timeseries_svg(cols: &[Col], series: Series) -> String {
    let values = series_values(cols, series);
    let max = values.iter().cloned().fold(0.0, f64::max);
    let mut o = String::with_capacity(16 * 1024);
    svg_open(
        &mut o,
        match series {
            Series::CumulativeCost => "cumulative cost over time",
            Series::RequestsPerMinute => "requests per minute over time",
        },
    );
    let fmt: &dyn Fn(f64) -> String = match series {
        Series::CumulativeCost => &usd_tick,
        Series::RequestsPerMinute => &short,
    };
    let top = y_axis(&mut o, if max > 0.0 { max } else { 1.0 }, fmt);
    let mut pen = Pen::new(series, column_width(cols), top);
    let mut vi = 0;
    for (i, c) in cols.iter().enumerate() {
        match c {
            Col::Data {
                start_ms,
                minutes,
                requests,
                rows,
                cost,
            } => {
                let v = values[vi];
                vi += 1;
                pen.days.insert(day(*start_ms));
                if i == 0 || matches!(cols[i - 1], Col::Break { .. }) {
                    pen.labels.push((pen.x, clock(*start_ms, *minutes)));
                }
                let end = start_ms + (minutes * 60_000.0) as i64;
                let when = format!("{}–{}", clock(*start_ms, *minutes), clock(end, *minutes));
                match series {
                    Series::RequestsPerMinute => pen.bar(&mut o, v, &when, *requests, *rows),
                    Series::CumulativeCost => pen.step(&mut o, v, &when, *cost),
                }
                pen.x += pen.cw;
            }
            Col::Break { from_ms, to_ms } => pen.gap(&mut o, *from_ms, *to_ms),
        }
    }
    pen.finish(o, cols)
}

/// The series' value at each data column: the running total, or the rate.
fn series_values(cols: &[Col], series: Series) -> Vec<f64> {
    let mut values = Vec::with_capacity(cols.len());
    let mut acc = 0.0;
    for c in cols {
        if let Col::Data {
            minutes,
            requests,
            cost,
            ..
        } = c
        {
            acc += cost;
            values.push(match series {
                Series::CumulativeCost => acc,
                Series::RequestsPerMinute => *requests as f64 / minutes,
            });
        }
    }
    values
}

/// A data column's width: a break is as wide as two, so a long pause takes little room.
fn column_width(cols: &[Col]) -> f64 {
    let units: f64 = cols
        .iter()
        .map(|c| match c {
            Col::Data { .. } => 1.0,
            Col::Break { .. } => 2.0,
        })
        .sum();
    let plot_w = W - LEFT - RIGHT;
    plot_w / units.max(1.0)
}

/// A series over time as it is drawn, column by column from the left: where the next column
/// goes, the cost line so far, and the labels and days to write under the columns at the end.
struct Pen {
    series: Series,
    /// A data column's width.
    cw: f64,
    /// The value at the top of the y axis.
    top: f64,
    x: f64,
    points: String,
    last_y: f64,
    days: BTreeSet<String>,
    labels: Vec<(f64, String)>,
}

impl Pen {
    fn new(series: Series, cw: f64, top: f64) -> Self {
        Pen {
            series,
            cw,
            top,
            x: LEFT,
            points: String::new(),
            last_y: H - BOTTOM,
            days: BTreeSet::new(),
            labels: Vec::new(),
        }
    }

    fn y_of(&self, v: f64) -> f64 {
        let base = H - BOTTOM;
        base - (H - TOP - BOTTOM) * v / self.top
    }

    /// A column of requests per minute: its bar.
    fn bar(&self, o: &mut String, v: f64, when: &str, requests: u64, rows: u64) {
        let (x, cw, base) = (self.x, self.cw, H - BOTTOM);
        let y = self.y_of(v);
        let _ = write!(
            o,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{when} UTC: {} requests, {} rows finished</title></rect>",
            x,
            (cw - 0.5).max(0.5),
            base - y,
            group(requests),
            group(rows)
        );
    }

    /// A column of cumulative cost: the line's step up to the total, and a target to hover
    /// over the column for its figures.
    fn step(&mut self, o: &mut String, v: f64, when: &str, cost: f64) {
        let (x, cw, base, last_y) = (self.x, self.cw, H - BOTTOM, self.last_y);
        let y = self.y_of(v);
        if self.points.is_empty() {
            let _ = write!(self.points, "{x:.1},{base:.1} ");
        }
        let _ = write!(self.points, "{x:.1},{last_y:.1} {:.1},{y:.1} ", x + cw);
        self.last_y = y;
        let _ = write!(
            o,
            "<rect class=\"hit\" x=\"{x:.1}\" y=\"{TOP}\" width=\"{cw:.2}\" height=\"{}\"><title>{when} UTC: {} in this bin, {} in all</title></rect>",
            H - TOP - BOTTOM,
            usd(cost),
            usd(v)
        );
    }

    /// A break: a dashed line that says how long nothing finished; the cost line runs flat
    /// across it.
    fn gap(&mut self, o: &mut String, from_ms: i64, to_ms: i64) {
        let (x, cw, base, last_y) = (self.x, self.cw, H - BOTTOM, self.last_y);
        let mid = x + cw;
        let _ = write!(
            o,
            "<line class=\"gap\" x1=\"{mid:.1}\" x2=\"{mid:.1}\" y1=\"{TOP}\" y2=\"{base}\"><title>nothing finished for {} ({} to {} UTC)</title></line>",
            gap_text(to_ms - from_ms),
            format_timestamp(from_ms)[..16].replace('T', " "),
            format_timestamp(to_ms)[..16].replace('T', " ")
        );
        if self.series == Series::CumulativeCost && !self.points.is_empty() {
            let _ = write!(self.points, "{:.1},{last_y:.1} ", x + 2.0 * cw);
        }
        self.x += 2.0 * cw;
    }

    /// The cost line, the times under the columns and the days under them; closes the chart.
    fn finish(mut self, mut o: String, cols: &[Col]) -> String {
        if self.series == Series::CumulativeCost {
            let _ = write!(
                o,
                "<polyline class=\"line\" points=\"{}\"/>",
                self.points.trim_end()
            );
        }
        if let Some(Col::Data {
            start_ms, minutes, ..
        }) = cols.last()
        {
            let end = start_ms + (minutes * 60_000.0) as i64;
            self.labels.push((W - RIGHT, clock(end, *minutes)));
        }
        time_labels(&mut o, self.labels);
        let span = match (self.days.first(), self.days.last()) {
            (Some(a), Some(b)) if a != b => format!("{a} to {b}, UTC"),
            (Some(a), _) => format!("{a}, UTC"),
            _ => String::new(),
        };
        let plot_w = W - LEFT - RIGHT;
        let _ = write!(
            o,
            "<text class=\"axis\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text></svg>",
            LEFT + plot_w / 2.0,
            H - 4.0,
            escape(&span)
        );
        o
    }
}

/// Times along the bottom: each run's start and the last column's end. Labels closer than
/// ~40 px to the one before are dropped, all but the last.
fn time_labels(o: &mut String, labels: Vec<(f64, String)>) {
    let mut last_x = f64::NEG_INFINITY;
    let n = labels.len();
    for (i, (lx, text)) in labels.into_iter().enumerate() {
        if lx - last_x < 40.0 && i != n - 1 {
            continue;
        }
        let anchor = if i == n - 1 { "end" } else { "start" };
        let _ = write!(
            o,
            "<text class=\"tick\" x=\"{lx:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            H - BOTTOM + 14.0,
            escape(&text)
        );
        last_x = lx;
    }
}

/// Cumulative cost against the record's position, for outputs whose records carry no time.
pub(crate) fn cost_by_record_svg(points: &[(u64, f64)]) -> String {
    let Some(&(last_n, _)) = points.last() else {
        return empty_svg("no records");
    };
    let max = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut o = String::with_capacity(16 * 1024);
    svg_open(&mut o, "cumulative cost by record");
    let top = y_axis(&mut o, if max > 0.0 { max } else { 1.0 }, &usd_tick);
    let plot_w = W - LEFT - RIGHT;
    let base = H - BOTTOM;
    let mut pts = format!("{LEFT:.1},{base:.1} ");
    for &(n, c) in points {
        let x = LEFT + plot_w * n as f64 / last_n.max(1) as f64;
        let y = base - (H - TOP - BOTTOM) * c / top;
        let _ = write!(pts, "{x:.1},{y:.1} ");
    }
    let _ = write!(
        o,
        "<polyline class=\"line\" points=\"{}\"/>\
         <text class=\"tick\" x=\"{LEFT}\" y=\"{}\">1</text>\
         <text class=\"tick\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text class=\"axis\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">record</text></svg>",
        pts.trim_end(),
        H - BOTTOM + 14.0,
        W - RIGHT,
        H - BOTTOM + 14.0,
        group(last_n),
        LEFT + plot_w / 2.0,
        H - 4.0
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_1_2_5() {
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(150.0), 200.0);
    }

    #[test]
    fn histogram_bins_cover_every_value_and_cut_a_long_tail() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 2).unwrap();
        for v in 100..=400 {
            h.record(v).unwrap();
        }
        let bins = linear_bins(&h);
        assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 301);
        assert!(bins.len() <= 2 * HIST_BINS as usize, "{}", bins.len());
        assert!(!bins.iter().any(|b| b.open));
        // Two outliers far out: one open bin holds the top 1% (them and the 400), the rest
        // keep their resolution.
        h.record(60_000).unwrap();
        h.record(90_000).unwrap();
        let bins = linear_bins(&h);
        let last = bins.last().unwrap();
        assert!(last.open && last.count == 3 && last.lo == 400, "{last:?}");
        assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 303);
        assert!(bins[0].hi - bins[0].lo <= 20);
        // One value only.
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 2).unwrap();
        h.record_n(42, 5).unwrap();
        assert_eq!(
            linear_bins(&h),
            vec![Bin {
                lo: 42,
                hi: 43,
                count: 5,
                open: false
            }]
        );
    }
}
