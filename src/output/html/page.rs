//! The page around the table's rows: the head (style, summary cards, charts) and the tail
//! (the data for tools, the script).

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use super::svg::{
    cost_by_record_svg, empty_svg, gap_text, hbars_svg, histogram_svg, timeseries_svg, Series,
};
use super::tally::{cols_minutes, time_columns, Tally};
use super::text::{duration, escape, escape_into, group, json_for_script, usd};
use crate::ledger::record::format_timestamp;
use crate::report::Summary;

pub(crate) struct Page<'a> {
    pub(crate) output: &'a Path,
    pub(crate) tally: &'a Tally,
    pub(crate) summary: Option<&'a Summary>,
    pub(crate) stale: u64,
    pub(crate) table_rows: u64,
    pub(crate) table_cap: usize,
    /// Failed rows the table leaves out (past `[output] report_failed_rows`).
    pub(crate) failed_left: u64,
}

impl Page<'_> {
    /// Everything before the table's rows.
    pub(crate) fn head(&self) -> String {
        let t = self.tally;
        let name = self
            .output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut o = String::with_capacity(64 * 1024);
        o.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
        o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
        // Nothing may load from anywhere, and no script runs but ours (named by its hash): were
        // a payload ever to slip past `escape`, the browser would still refuse to run it.
        let _ = writeln!(
            o,
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
             style-src 'unsafe-inline'; script-src 'sha256-{}'\">",
            script_hash()
        );
        let _ = writeln!(o, "<title>{} · promptmill report</title>", escape(&name));
        o.push_str("<style>");
        o.push_str(CSS);
        o.push_str("</style></head><body>\n<header><h1>");
        escape_into(&mut o, &name);
        o.push_str(" <small>promptmill report</small></h1><p class=\"meta\">");
        escape_into(&mut o, &self.output.display().to_string());
        let _ = writeln!(
            o,
            " · {} records · made {} UTC</p></header>",
            group(t.records),
            &format_timestamp(now_ms())[..16].replace('T', " ")
        );
        self.summary_section(&mut o);
        self.charts_section(&mut o);
        self.table_open(&mut o);
        o
    }

    /// The banner when the last run stopped early, and the summary cards.
    fn summary_section(&self, o: &mut String) {
        if let Some(why) = self.summary.and_then(|s| s.stopped.as_deref()) {
            o.push_str("<div class=\"stopped\"><b>The last run stopped early.</b> ");
            escape_into(o, why);
            o.push_str("</div>\n");
        }
        o.push_str("<section class=\"cards\">\n");
        self.rows_card(o);
        self.tokens_card(o);
        self.cost_card(o);
        self.latency_card(o);
        match self.summary {
            Some(s) => last_run_card(o, s),
            None => self.runs_card(o),
        }
        o.push_str("</section>\n");
    }

    /// The output, from its records.
    fn rows_card(&self, o: &mut String) {
        let t = self.tally;
        let mut rows = vec![
            ("ok", group(t.ok)),
            ("failed", failed_text(t)),
            (
                "stale",
                format!(
                    "{} <small>(records of rows no longer in the input)</small>",
                    group(self.stale)
                ),
            ),
        ];
        if t.copied > 0 {
            rows.push((
                "copied",
                format!(
                    "{} <small>(same request as another row, not sent)</small>",
                    group(t.copied)
                ),
            ));
        }
        if let Some(p) = self.summary.map(|s| s.rows_pending).filter(|&p| p > 0) {
            rows.push((
                "pending",
                format!(
                    "{} <small>(the last run stopped before them)</small>",
                    group(p)
                ),
            ));
        }
        if t.unreadable > 0 {
            rows.push((
                "not records",
                format!("{} <small>lines</small>", group(t.unreadable)),
            ));
        }
        card(o, "Rows", "in this output", &rows);
    }

    fn tokens_card(&self, o: &mut String) {
        let t = self.tally;
        let mut tokens = vec![
            ("prompt", group(t.prompt_tokens)),
            ("completion", group(t.completion_tokens)),
            ("total", group(t.prompt_tokens + t.completion_tokens)),
        ];
        if let Some(s) = self
            .summary
            .filter(|s| s.cached_tokens > 0 || s.reasoning_tokens > 0)
        {
            tokens.push((
                "cached / reasoning (last run)",
                format!("{} / {}", group(s.cached_tokens), group(s.reasoning_tokens)),
            ));
        }
        if let Some(line) = self.summary.and_then(|s| s.cache_line()) {
            tokens.push(("prompt cache (last run)", line));
        }
        card(o, "Tokens", "in this output", &tokens);
    }

    fn cost_card(&self, o: &mut String) {
        let t = self.tally;
        let mut cost = vec![("recorded", usd(t.cost))];
        if t.unpriced > 0 {
            cost.push((
                "unknown price",
                format!("{} rows <small>(set [pricing])</small>", group(t.unpriced)),
            ));
        }
        if t.unconfirmed > 0.0 {
            cost.push((
                "unconfirmed",
                format!(
                    "{} <small>(may have been billed without an answer, worst case)</small>",
                    usd(t.unconfirmed)
                ),
            ));
        }
        if let Some(s) = self.summary {
            match (s.spent_usd, s.budget_usd) {
                (Some(sp), Some(b)) => {
                    cost.push(("spent / budget", format!("{} / {}", usd(sp), usd(b))))
                }
                (Some(sp), None) => cost.push(("spent across runs", usd(sp))),
                _ => {}
            }
        }
        card(o, "Cost", "USD", &cost);
    }

    fn latency_card(&self, o: &mut String) {
        let t = self.tally;
        let q = |p: f64| {
            if t.latency.is_empty() {
                "-".to_string()
            } else {
                format!("{} ms", group(t.latency.value_at_quantile(p)))
            }
        };
        card(
            o,
            "Latency",
            "per row, retries included",
            &[("p50", q(0.5)), ("p95", q(0.95)), ("p99", q(0.99))],
        );
    }

    /// With no summary file, what the records alone tell of the runs that wrote them.
    fn runs_card(&self, o: &mut String) {
        let t = self.tally;
        let wall = match (t.first_ms, t.last_ms) {
            (Some(a), Some(b)) if b > a => Some((b - a) as f64 / 1000.0),
            _ => None,
        };
        let sent = t.records - t.copied - t.failed_input;
        card(
            o,
            "Runs",
            "no summary file: from the records",
            &[
                (
                    "first start → last finish",
                    wall.map(duration).unwrap_or_else(|| "-".into()),
                ),
                (
                    "rows/s",
                    wall.map(|w| format!("{:.2}", sent as f64 / w))
                        .unwrap_or_else(|| "-".into()),
                ),
                ("retries", group(t.retries)),
                ("429s", "unknown <small>(not in records)</small>".into()),
                ("why it stopped", "unknown".into()),
            ],
        );
    }

    fn charts_section(&self, o: &mut String) {
        let t = self.tally;
        o.push_str("<section class=\"charts\">\n");
        self.histogram_figures(o);
        self.time_figures(o);
        figure(
            o,
            "Errors by kind",
            &format!("failed rows: {}", group(t.failed)),
            &hbars_svg(&error_kinds(t)),
        );
        o.push_str("</section>\n");
    }

    /// Latency and completion tokens, row by row.
    fn histogram_figures(&self, o: &mut String) {
        let t = self.tally;
        figure(
            o,
            "Latency",
            &format!(
                "rows by time to a final answer (retries included), {} rows that sent a request",
                group(t.latency.len())
            ),
            &histogram_svg(&t.latency, "ms", "rows"),
        );
        let mean = |h: &Histogram<u64>| {
            if h.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", h.mean())
            }
        };
        figure(
            o,
            "Completion tokens per row",
            &format!(
                "ok rows that were sent; mean {} completion and {} prompt tokens",
                mean(&t.completion_hist),
                mean(&t.prompt_hist)
            ),
            &histogram_svg(&t.completion_hist, "tokens", "rows"),
        );
    }

    /// Cost and requests over time; with no times in the records, cost by record instead.
    fn time_figures(&self, o: &mut String) {
        let t = self.tally;
        let cols = time_columns(t);
        let untimed = if t.untimed > 0 {
            format!(
                "; {} records have no finished_at (written before promptmill recorded it) and are left out",
                group(t.untimed)
            )
        } else {
            String::new()
        };
        if cols.is_empty() {
            figure(
                o,
                "Cumulative cost",
                "by record, in file order: no record carries the time it finished",
                &cost_by_record_svg(&t.cost_by_record),
            );
            figure(
                o,
                "Requests per minute",
                "no record carries the time it finished",
                &empty_svg("no times in this output"),
            );
        } else {
            let w = cols_minutes(&cols);
            figure(
                o,
                "Cumulative cost",
                &format!("USD recorded by the time rows finished (UTC){untimed}"),
                &timeseries_svg(&cols, Series::CumulativeCost),
            );
            figure(
                o,
                "Requests per minute",
                &format!(
                    "requests sent (a row's retries counted when it finished), one bar per {}{untimed}",
                    gap_text((w * 60_000.0) as i64)
                ),
                &timeseries_svg(&cols, Series::RequestsPerMinute),
            );
        }
    }

    fn table_open(&self, o: &mut String) {
        let t = self.tally;
        let note = if self.failed_left > 0 {
            format!(
                "The table holds the first {} records and the first {} failed ones after them: {} of {}. <strong>{} more failed rows are not in the table</strong> (the output file has them all). The charts cover all of them; <code>promptmill report --rows N --failed-rows N</code> (or <code>[output] report_rows</code>, <code>report_failed_rows</code>) holds more.",
                group(self.table_cap as u64),
                group(self.table_rows.saturating_sub(self.table_cap as u64)),
                group(self.table_rows),
                group(t.records),
                group(self.failed_left)
            )
        } else if self.table_rows < t.records {
            format!(
                "The table holds the first {} records and every failed one: {} of {}. The charts cover all of them; <code>promptmill report --rows N</code> (or <code>[output] report_rows</code>) holds more.",
                group(self.table_cap as u64),
                group(self.table_rows),
                group(t.records)
            )
        } else {
            format!("All {} records.", group(t.records))
        };
        let _ = write!(
            o,
            "<section class=\"rows\"><h2>Rows</h2><p class=\"meta\">{note}</p>\n\
             <div class=\"controls\"><label>Status <select id=\"status\"><option value=\"all\">all</option>\
             <option value=\"ok\">ok</option><option value=\"failed\">failed</option></select></label> \
             <label>Search <input id=\"q\" type=\"search\" placeholder=\"text in any cell\"></label> \
             <span id=\"shown\" class=\"meta\"></span></div>\n\
             <table id=\"rows\"><thead><tr><th>row</th><th>id</th><th>status</th><th>input</th>\
             <th>output</th><th>tokens</th><th>cost</th><th>latency</th><th>attempts</th></tr></thead><tbody>\n"
        );
    }

    /// Everything after the table's rows.
    pub(crate) fn tail(&self) -> String {
        let t = self.tally;
        let data = serde_json::json!({
            "output": self.output.display().to_string(),
            "records": t.records,
            "ok": t.ok,
            "failed": t.failed,
            "stale": self.stale,
            "table_rows": self.table_rows,
            "table_cap": self.table_cap,
            "failed_left": self.failed_left,
            "summary": self.summary,
        });
        let mut o = String::with_capacity(4096);
        o.push_str("</tbody></table></section>\n<footer class=\"meta\">Made by promptmill ");
        o.push_str(env!("CARGO_PKG_VERSION"));
        o.push_str(". This file loads nothing from anywhere: it works offline.</footer>\n");
        o.push_str("<script type=\"application/json\" id=\"report-data\">");
        o.push_str(&json_for_script(&data));
        o.push_str("</script>\n<script>");
        o.push_str(JS);
        o.push_str("</script>\n</body></html>\n");
        o
    }
}

/// The failed rows, with what a rerun would do about them.
fn failed_text(t: &Tally) -> String {
    if t.failed == 0 {
        return "0".into();
    }
    let parts: Vec<String> = [
        (
            t.failed_transient,
            "transient: a plain rerun sends them again",
        ),
        (
            t.failed - t.failed_transient - t.failed_input,
            "API verdicts",
        ),
        (t.failed_input, "unreadable input"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{} {what}", group(*n)))
    .collect();
    format!("{} <small>({})</small>", group(t.failed), parts.join("; "))
}

/// The failed rows by error kind and HTTP status, the most common first.
fn error_kinds(t: &Tally) -> Vec<(String, u64)> {
    let mut v: Vec<_> = t
        .errors
        .iter()
        .map(|((k, s), n)| {
            (
                match s {
                    Some(s) => format!("{k} (HTTP {s})"),
                    None => k.clone(),
                },
                *n,
            )
        })
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The last run, from its summary file.
fn last_run_card(o: &mut String, s: &Summary) {
    let mut run = vec![
        (
            "rows done",
            format!(
                "{} <small>(ok {}, failed {})</small>",
                group(s.rows_ok + s.rows_failed),
                group(s.rows_ok),
                group(s.rows_failed)
            ),
        ),
        (
            "skipped",
            format!("{} <small>(done before)</small>", group(s.rows_skipped)),
        ),
        ("wall time", duration(s.wall_time_s)),
        ("rows/s", format!("{:.2}", s.rows_per_s)),
        ("retries", group(s.retries)),
        ("429s", group(s.rate_limited)),
    ];
    run.push((
        "ended",
        match &s.stopped {
            Some(_) => "stopped early (see above)".into(),
            None => "finished".into(),
        },
    ));
    card(o, "Last run", "from the summary file", &run);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A summary card: a title, a subtitle and label/value lines (values are trusted HTML built
/// here from numbers; nothing from a record reaches them unescaped).
fn card(o: &mut String, title: &str, sub: &str, rows: &[(&str, String)]) {
    let _ = write!(
        o,
        "<div class=\"card\"><h2>{title} <small>{sub}</small></h2><dl>"
    );
    for (k, v) in rows {
        let _ = write!(o, "<dt>{k}</dt><dd>{v}</dd>");
    }
    o.push_str("</dl></div>\n");
}

fn figure(o: &mut String, title: &str, caption: &str, svg: &str) {
    let _ = writeln!(
        o,
        "<figure><figcaption><b>{title}</b> <small>{caption}</small></figcaption>{svg}</figure>"
    );
}

// ---------------------------------------------------------------------------------------------
// Inline style and script

/// The CSP hash of `JS`: base64 of its SHA-256.
fn script_hash() -> String {
    use base64::Engine as _;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(JS.as_bytes()))
}

const CSS: &str = r#"
:root{--fg:#1d2330;--muted:#5f6b7a;--bg:#fff;--card:#f5f7fa;--line:#dde2e8;--bar:#4a78c2;--tail:#98abc9;--err:#c2493f;--ok:#2e8540;--warn:#fff3d6;--warnline:#e0b44c}
@media (prefers-color-scheme:dark){:root{--fg:#e3e7ee;--muted:#9aa5b4;--bg:#15181e;--card:#1e232b;--line:#313844;--bar:#6b9ae6;--tail:#4d607e;--err:#e0675c;--ok:#58b46b;--warn:#3a3220;--warnline:#8a6d2a}}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);margin:0 auto;padding:16px 24px 48px;max-width:1400px}
h1{font-size:22px;margin:0 0 2px}h1 small,h2 small,figcaption small{font-weight:normal;color:var(--muted)}
h2{font-size:15px;margin:0 0 8px}
.meta{color:var(--muted);margin:2px 0 12px}
.stopped{background:var(--warn);border:1px solid var(--warnline);border-radius:6px;padding:10px 14px;margin:12px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px;margin:12px 0 20px}
.card{background:var(--card);border-radius:8px;padding:12px 14px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 12px;margin:0}dt{color:var(--muted)}dd{margin:0;font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:16px;margin-bottom:24px}
figure{margin:0;background:var(--card);border-radius:8px;padding:10px 12px}
figcaption{margin-bottom:6px}
svg{width:100%;height:auto;display:block}
svg .bar{fill:var(--bar)}svg .bar.tail{fill:var(--tail)}svg .bar.err{fill:var(--err)}
svg .grid{stroke:var(--line);stroke-width:1}svg .gap{stroke:var(--muted);stroke-dasharray:3 3}
svg .line{fill:none;stroke:var(--bar);stroke-width:2}svg .hit{fill:transparent}svg .hit:hover{fill:var(--line);opacity:.4}
svg text{fill:var(--muted);font-size:12px}svg .empty{font-size:14px}
.controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin:8px 0}
select,input{font:inherit;padding:3px 6px}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid var(--line);padding:6px 8px;text-align:left;vertical-align:top}
th{position:sticky;top:0;background:var(--bg)}
td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.fields{max-width:360px}td.fields div{overflow-wrap:anywhere}
td.out{min-width:320px}
.text{white-space:pre-wrap;overflow-wrap:anywhere;max-height:18em;overflow:auto}
.err{color:var(--err);white-space:pre-wrap;overflow-wrap:anywhere}
.note{color:var(--muted);font-size:12px}
.extra{margin-top:6px}.extra pre{margin:2px 0 0;white-space:pre-wrap;font-size:12px;max-height:14em;overflow:auto}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;color:#fff}
.badge.ok{background:var(--ok)}.badge.failed{background:var(--err)}.badge.copy{background:var(--muted)}
footer{margin-top:24px}
"#;

const JS: &str = r##"
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var rows = Array.prototype.slice.call(document.querySelectorAll("#rows tbody tr"));
  var status = document.getElementById("status");
  var query = document.getElementById("q");
  var shown = document.getElementById("shown");
  var texts = null;
  function apply() {
    var s = status.value;
    var q = query.value.trim().toLowerCase();
    if (q && !texts) {
      texts = rows.map(function (r) { return r.textContent.toLowerCase(); });
    }
    var n = 0;
    rows.forEach(function (r, i) {
      var visible = (s === "all" || r.getAttribute("data-status") === s) &&
        (!q || texts[i].indexOf(q) !== -1);
      r.hidden = !visible;
      if (visible) { n += 1; }
    });
    shown.textContent = n.toLocaleString("en") + " of " + rows.length.toLocaleString("en") +
      " table rows shown" + (data.table_rows < data.records ?
        " (" + data.records.toLocaleString("en") + " records in the output)" : "");
  }
  status.addEventListener("change", apply);
  query.addEventListener("input", apply);
  apply();
})();
"##;
