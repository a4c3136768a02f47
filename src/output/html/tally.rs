//! The pass over the records: every figure the summary and the charts show, summed as the
//! records stream past, in memory that does not grow with the output.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::ledger::journal;
use crate::ledger::record::{parse_timestamp, Status};
use crate::ledger::{error_outcome, Outcome};

/// Points in a line chart at most.
pub(crate) const CHART_POINTS: usize = 600;

/// Time bins at most: past this they widen along `BIN_WIDTHS`, so a file whose times are
/// spread over years still sums into bounded memory.
const MAX_TIME_BINS: usize = 20_000;

/// Bin and chart-column widths, in ms. Each divides the next, so bins of one width fall
/// whole into columns of any wider one; past the list, widths double.
const BIN_WIDTHS: &[i64] = &[
    1_000, 2_000, 10_000, 30_000, 60_000, 120_000, 600_000, 1_800_000, 3_600_000, 7_200_000,
    21_600_000, 43_200_000, 86_400_000,
];

/// The width after `w`.
fn wider(w: i64) -> i64 {
    BIN_WIDTHS.iter().copied().find(|&x| x > w).unwrap_or(w * 2)
}

#[derive(Debug, Default, Clone, Copy)]
struct TimeBin {
    requests: u64,
    rows: u64,
    cost: f64,
}

/// Everything the summary and the charts need, summed over every record.
pub(crate) struct Tally {
    pub(crate) records: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) failed_transient: u64,
    pub(crate) failed_input: u64,
    pub(crate) copied: u64,
    pub(crate) unreadable: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) cost: f64,
    pub(crate) unconfirmed: f64,
    /// Ok rows with usage but no price: their cost is unknown, not zero.
    pub(crate) unpriced: u64,
    /// Requests sent (a row's attempts), and the retries among them.
    requests: u64,
    pub(crate) retries: u64,
    pub(crate) latency: Histogram<u64>,
    pub(crate) completion_hist: Histogram<u64>,
    pub(crate) prompt_hist: Histogram<u64>,
    /// (kind, HTTP status) → rows.
    pub(crate) errors: BTreeMap<(String, Option<u16>), u64>,
    /// Bin start (Unix ms, a multiple of `bin_ms`) → what finished in it.
    bins: BTreeMap<i64, TimeBin>,
    bin_ms: i64,
    /// The earliest start (finish − latency) and the latest finish.
    pub(crate) first_ms: Option<i64>,
    pub(crate) last_ms: Option<i64>,
    /// Records with no usable `finished_at` (written by an older promptmill, or another tool).
    pub(crate) untimed: u64,
    /// Cumulative cost by record, for outputs without times: every `cost_every`-th point.
    pub(crate) cost_by_record: Vec<(u64, f64)>,
    cost_every: u64,
}

impl Default for Tally {
    fn default() -> Self {
        let hist = |max| Histogram::new_with_bounds(1, max, 2).expect("valid histogram bounds");
        Tally {
            records: 0,
            ok: 0,
            failed: 0,
            failed_transient: 0,
            failed_input: 0,
            copied: 0,
            unreadable: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost: 0.0,
            unconfirmed: 0.0,
            unpriced: 0,
            requests: 0,
            retries: 0,
            latency: hist(7 * 24 * 3_600_000),
            completion_hist: hist(100_000_000),
            prompt_hist: hist(100_000_000),
            errors: BTreeMap::new(),
            bins: BTreeMap::new(),
            bin_ms: BIN_WIDTHS[0],
            first_ms: None,
            last_ms: None,
            untimed: 0,
            cost_by_record: Vec::new(),
            cost_every: 1,
        }
    }
}

impl Tally {
    pub(crate) fn add(&mut self, l: &journal::Line) {
        self.records += 1;
        let copied = l.copied_from.is_some();
        match l.status {
            Status::Ok => self.ok += 1,
            Status::Error => {
                self.failed += 1;
                if let Some(e) = &l.error {
                    match error_outcome(e.kind) {
                        Outcome::FailedTransient => self.failed_transient += 1,
                        Outcome::Input => self.failed_input += 1,
                        _ => {}
                    }
                    *self
                        .errors
                        .entry((kind_name(e.kind), e.status))
                        .or_default() += 1;
                } else {
                    *self.errors.entry(("unknown".into(), None)).or_default() += 1;
                }
            }
        }
        if copied {
            self.copied += 1;
        }
        let cost = l.cost_usd.unwrap_or(0.0);
        self.cost += cost;
        self.unconfirmed += l.unconfirmed_usd.unwrap_or(0.0);
        if let Some(u) = &l.usage {
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
            if l.status == Status::Ok && !copied {
                self.completion_hist.saturating_record(u.completion_tokens);
                self.prompt_hist.saturating_record(u.prompt_tokens);
                if l.cost_usd.is_none() {
                    self.unpriced += 1;
                }
            }
        }
        // A request went out: not a copy, not a row that could not be read or rendered.
        let attempts = if copied { 0 } else { l.attempts.unwrap_or(0) } as u64;
        if attempts > 0 {
            self.requests += attempts;
            self.retries += attempts - 1;
            if let Some(ms) = l.latency_ms {
                self.latency.saturating_record(ms.max(1));
            }
        }
        match l.finished_at.as_deref().and_then(parse_timestamp) {
            Some(t) => {
                let start = t - l.latency_ms.unwrap_or(0) as i64;
                self.first_ms = Some(self.first_ms.map_or(start, |f| f.min(start)));
                self.last_ms = Some(self.last_ms.map_or(t, |f| f.max(t)));
                let bin = self.bins.entry(t.div_euclid(self.bin_ms) * self.bin_ms);
                let b = bin.or_default();
                b.requests += attempts;
                b.rows += 1;
                b.cost += cost;
                if self.bins.len() > MAX_TIME_BINS {
                    self.widen_bins();
                }
            }
            None => self.untimed += 1,
        }
        if self.records.is_multiple_of(self.cost_every) {
            self.cost_by_record.push((self.records, self.cost));
            if self.cost_by_record.len() >= 2 * CHART_POINTS {
                // Keep every other point: the series stays under a fixed size at any length.
                let mut i = 0;
                self.cost_by_record.retain(|_| {
                    i += 1;
                    i % 2 == 0
                });
                self.cost_every *= 2;
            }
        }
    }

    fn widen_bins(&mut self) {
        self.bin_ms = wider(self.bin_ms);
        let w = self.bin_ms;
        let old = std::mem::take(&mut self.bins);
        for (k, v) in old {
            let b = self.bins.entry(k.div_euclid(w) * w).or_default();
            b.requests += v.requests;
            b.rows += v.rows;
            b.cost += v.cost;
        }
    }
}

fn kind_name(k: crate::provider::ErrorKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{k:?}"))
}

/// A column of a chart over time: a bin of finished rows, or a break where nothing finished
/// for a long while (between two runs, say), drawn narrow so a week's pause does not flatten
/// the runs on either side.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Col {
    Data {
        start_ms: i64,
        minutes: f64,
        requests: u64,
        rows: u64,
        cost: f64,
    },
    Break {
        from_ms: i64,
        to_ms: i64,
    },
}

/// Idle stretches longer than this become a break.
const GAP_MS: i64 = 10 * 60_000;

/// The chart's columns: the bins summed into columns of one width from `BIN_WIDTHS` (about
/// `CHART_POINTS` across the time anything happened), idle columns inside a run as zeros,
/// idle stretches longer than `GAP_MS` as breaks.
pub(crate) fn time_columns(t: &Tally) -> Vec<Col> {
    let gap = |w: i64| GAP_MS.max(w);
    // The time anything happened: the bins' span without the long pauses.
    let mut active = 0;
    let mut prev: Option<i64> = None;
    for &k in t.bins.keys() {
        active += match prev {
            Some(p) if k - p <= gap(t.bin_ms) => k - p,
            _ => t.bin_ms,
        };
        prev = Some(k);
    }
    let mut w = t.bin_ms;
    while active / w > CHART_POINTS as i64 {
        w = wider(w);
    }
    let mut sums: BTreeMap<i64, TimeBin> = BTreeMap::new();
    for (&k, v) in &t.bins {
        let c = sums.entry(k.div_euclid(w) * w).or_default();
        c.requests += v.requests;
        c.rows += v.rows;
        c.cost += v.cost;
    }
    let data = |start_ms: i64, b: TimeBin| Col::Data {
        start_ms,
        minutes: w as f64 / 60_000.0,
        requests: b.requests,
        rows: b.rows,
        cost: b.cost,
    };
    let mut cols = Vec::new();
    let mut prev: Option<i64> = None;
    for (&k, &b) in &sums {
        if let Some(p) = prev {
            if k - p > gap(w) {
                cols.push(Col::Break {
                    from_ms: p + w,
                    to_ms: k,
                });
            } else {
                let mut z = p + w;
                while z < k {
                    cols.push(data(z, TimeBin::default()));
                    z += w;
                }
            }
        }
        cols.push(data(k, b));
        prev = Some(k);
    }
    cols
}

/// The width of the columns, in minutes.
pub(crate) fn cols_minutes(cols: &[Col]) -> f64 {
    cols.iter()
        .find_map(|c| match c {
            Col::Data { minutes, .. } => Some(*minutes),
            Col::Break { .. } => None,
        })
        .unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use super::super::svg::{timeseries_svg, Series};
    use super::*;
    use crate::ledger::record::format_timestamp;

    fn line(json: &str) -> journal::Line<'_> {
        journal::parse_line(json.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn time_bins_fill_short_pauses_and_break_at_long_ones() {
        let mut t = Tally::default();
        let at = |min: i64| format_timestamp(1_763_200_000_000 / 60_000 * 60_000 + min * 60_000);
        // Minute-wide bins, as a long run's would be.
        t.bin_ms = 60_000;
        let lines: Vec<String> = [0, 0, 1, 4, 300, 301]
            .iter()
            .map(|&m| {
                format!(
                    r#"{{"row":1,"id":"1","status":"ok","fingerprint":"f","attempts":2,"latency_ms":5,"cost_usd":0.5,"finished_at":"{}"}}"#,
                    at(m)
                )
            })
            .collect();
        for l in &lines {
            t.add(&line(l));
        }
        let cols = time_columns(&t);
        let data: Vec<u64> = cols
            .iter()
            .filter_map(|c| match c {
                Col::Data { requests, .. } => Some(*requests),
                Col::Break { .. } => None,
            })
            .collect();
        // Minutes 0-4 (2 idle ones filled), a break, minutes 300-301.
        assert_eq!(data, vec![4, 2, 0, 0, 2, 2, 2]);
        assert!(matches!(cols[5], Col::Break { .. }));
        assert_eq!(t.retries, 6);
        assert!((t.cost - 3.0).abs() < 1e-9);
        let svg = timeseries_svg(&cols, Series::CumulativeCost);
        assert!(svg.contains("polyline") && svg.contains("class=\"gap\""));
    }

    #[test]
    fn scattered_times_widen_the_bins_instead_of_growing_them() {
        let mut t = Tally::default();
        for i in 0..(MAX_TIME_BINS as i64 * 3) {
            let l = format!(
                r#"{{"row":1,"id":"1","status":"ok","fingerprint":"f","attempts":1,"finished_at":"{}"}}"#,
                format_timestamp(i * 7 * 60_000)
            );
            t.add(&line(&l));
        }
        assert!(t.bins.len() <= MAX_TIME_BINS);
        assert!(t.bin_ms > 60_000, "{}", t.bin_ms);
        assert_eq!(t.bins.values().map(|b| b.rows).sum::<u64>(), t.records);
        assert!(time_columns(&t).len() <= 2 * CHART_POINTS + 1);
    }

    #[test]
    fn the_cost_series_without_times_stays_small() {
        let mut t = Tally::default();
        for _ in 0..100_000 {
            t.add(&line(
                r#"{"row":1,"id":"1","status":"ok","fingerprint":"f","cost_usd":0.001}"#,
            ));
        }
        assert!(t.cost_by_record.len() < 2 * CHART_POINTS);
        assert_eq!(t.untimed, 100_000);
        let last = t.cost_by_record.last().unwrap();
        assert!((last.1 - last.0 as f64 * 0.001).abs() < 1e-6);
    }
}
