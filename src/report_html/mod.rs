//! The HTML report: one self-contained page (inline CSS, inline SVG charts drawn here, a few
//! lines of JS to filter the table) made from an output file in one streaming pass. Memory does
//! not grow with the output: histograms have fixed buckets, time is binned per minute (coarser
//! if the bins would pass a fixed number), and the table, which holds the first rows and every
//! failed one, is spooled to disk until the charts above it are known.
//!
//! Everything from the model or the input goes through `escape` (text and attribute values
//! alike) or, inside the one `<script type="application/json">`, through `json_for_script`:
//! a completion holding `<script>` is shown, never run.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::journal::{self, io_err};
use crate::ledger::{error_outcome, Outcome};
use crate::output::{format_timestamp, parse_timestamp, Status};
use crate::report::Summary;

/// What the report is made with.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The table's first rows; every failed row is added whatever this is.
    pub rows: usize,
    /// The last run's summary; `None`: read `OUTPUT.summary.json` if there is one.
    pub summary: Option<Summary>,
}

/// What went into a written report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub records: u64,
    pub table_rows: u64,
}

/// Writes the report of the output `output` to `target` (through a temporary file, renamed
/// into place, so a reader never sees half a report).
pub fn write(output: &Path, target: &Path, opts: &Options) -> Result<Written, Error> {
    let source = std::fs::canonicalize(output).map_err(|e| io_err(output, e))?;
    // `-o` naming the output itself would replace paid-for records with HTML.
    if std::fs::canonicalize(target).is_ok_and(|t| t == source) {
        return Err(Error::Other(format!(
            "{}: the report would overwrite the output itself; choose another file",
            target.display()
        )));
    }
    let summary = match &opts.summary {
        Some(s) => Some(s.clone()),
        None => read_summary(&crate::job::sibling(output, ".summary.json")),
    };
    let spool_path = crate::job::sibling(target, ".rows.tmp");
    let tmp = crate::job::sibling(target, ".tmp");
    let result = (|| {
        let spool = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spool_path)
            .map_err(|e| io_err(&spool_path, e))?;
        let mut table = Table::new(BufWriter::with_capacity(256 * 1024, spool), opts.rows);
        let mut tally = Tally::default();
        journal::for_each_line(output, |_, _, bytes| {
            let Ok(Some(line)) = journal::parse_line(bytes) else {
                if !bytes.trim_ascii().is_empty() {
                    tally.unreadable += 1;
                }
                return Ok(());
            };
            tally.add(&line);
            table
                .offer(&line, bytes)
                .map_err(|e| io_err(&spool_path, e))
        })?;
        let table_rows = table.rows;
        let mut spool = table.out.into_inner().map_err(|e| {
            let err = e.error();
            io_err(
                &spool_path,
                std::io::Error::new(err.kind(), err.to_string()),
            )
        })?;
        let stale = count_records(&crate::job::companion(output, "stale"))?;
        let page = Page {
            output,
            tally: &tally,
            summary: summary.as_ref(),
            stale,
            table_rows,
            table_cap: opts.rows,
        };
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = BufWriter::with_capacity(256 * 1024, f);
        let io = |e| io_err(&tmp, e);
        w.write_all(page.head().as_bytes()).map_err(io)?;
        use std::io::Seek;
        spool
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| io_err(&spool_path, e))?;
        std::io::copy(&mut spool, &mut w).map_err(io)?;
        w.write_all(page.tail().as_bytes()).map_err(io)?;
        w.into_inner()
            .map_err(|e| io(std::io::Error::other(e.to_string())))?
            .sync_data()
            .map_err(io)?;
        std::fs::rename(&tmp, target).map_err(|e| io_err(target, e))?;
        Ok(Written {
            records: tally.records,
            table_rows,
        })
    })();
    let _ = std::fs::remove_file(&spool_path);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn read_summary(path: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records in a companion file (the stale file); 0 when it does not exist.
fn count_records(path: &Path) -> Result<u64, Error> {
    let mut n = 0;
    journal::for_each_line(path, |_, _, bytes| {
        if let Ok(Some(_)) = journal::parse_line(bytes) {
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Escaping

/// HTML-escapes text for element content and for (double- or single-quoted) attribute values.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
    {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    escape_into(&mut out, s);
    Cow::Owned(out)
}

fn escape_into(out: &mut String, s: &str) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        out.push_str(&s[last..i]);
        out.push_str(rep);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

/// JSON to place inside `<script type="application/json">`: `<`, `>` and `&` are written as
/// `\u` escapes so no string can close the element or open a comment, and U+2028/U+2029 too,
/// so the text is also valid JavaScript.
pub fn json_for_script(v: &Value) -> String {
    let text = serde_json::to_string(v).expect("a JSON value serializes");
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The pass over the records

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
struct Tally {
    records: u64,
    ok: u64,
    failed: u64,
    failed_transient: u64,
    failed_input: u64,
    copied: u64,
    unreadable: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost: f64,
    unconfirmed: f64,
    /// Ok rows with usage but no price: their cost is unknown, not zero.
    unpriced: u64,
    /// Requests sent (a row's attempts), and the retries among them.
    requests: u64,
    retries: u64,
    latency: Histogram<u64>,
    completion_hist: Histogram<u64>,
    prompt_hist: Histogram<u64>,
    /// (kind, HTTP status) → rows.
    errors: BTreeMap<(String, Option<u16>), u64>,
    /// Bin start (Unix ms, a multiple of `bin_ms`) → what finished in it.
    bins: BTreeMap<i64, TimeBin>,
    bin_ms: i64,
    /// The earliest start (finish − latency) and the latest finish.
    first_ms: Option<i64>,
    last_ms: Option<i64>,
    /// Records with no usable `finished_at` (written by an older promptmill, or another tool).
    untimed: u64,
    /// Cumulative cost by record, for outputs without times: every `cost_every`-th point.
    cost_by_record: Vec<(u64, f64)>,
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
    fn add(&mut self, l: &journal::Line) {
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

// ---------------------------------------------------------------------------------------------
// The table

/// Table rows, written as HTML to the spool as the records stream past.
struct Table<W: Write> {
    out: W,
    cap: usize,
    seen: u64,
    rows: u64,
    buf: String,
}

impl<W: Write> Table<W> {
    fn new(out: W, cap: usize) -> Self {
        Table {
            out,
            cap,
            seen: 0,
            rows: 0,
            buf: String::with_capacity(4096),
        }
    }

    /// The first `cap` records, and every failed one after them.
    fn offer(&mut self, l: &journal::Line, bytes: &[u8]) -> std::io::Result<()> {
        self.seen += 1;
        if self.seen > self.cap as u64 && l.status != Status::Error {
            return Ok(());
        }
        let Ok(rec) = serde_json::from_slice::<Map<String, Value>>(bytes.trim_ascii()) else {
            return Ok(());
        };
        self.buf.clear();
        table_row(&mut self.buf, rec);
        self.rows += 1;
        self.out.write_all(self.buf.as_bytes())
    }
}

/// Fields the table shows in their own cells, or that are bookkeeping; every other field of a
/// record (structured data, variants, check results, another tool's fields) is shown as it is.
const OWN_FIELDS: &[&str] = &[
    "row",
    "id",
    "status",
    "input",
    "completion",
    "finish_reason",
    "model",
    "usage",
    "cost_usd",
    "attempts",
    "latency_ms",
    "fingerprint",
    "error",
    "copied_from",
    "unconfirmed_usd",
    "finished_at",
];

fn table_row(o: &mut String, mut r: Map<String, Value>) {
    let num = |r: &Map<String, Value>, k: &str| r.get(k).and_then(Value::as_u64);
    let ok = r.get("status").and_then(Value::as_str) == Some("ok");
    let status = if ok { "ok" } else { "failed" };
    let copied = r.get("copied_from").filter(|v| !v.is_null()).cloned();
    let _ = write!(
        o,
        "<tr data-status=\"{status}\"><td class=\"n\">{}</td><td>",
        num(&r, "row").map(|n| n.to_string()).unwrap_or_default()
    );
    escape_into(o, &text_of(r.get("id")));
    let _ = write!(o, "</td><td><span class=\"badge {status}\">{status}</span>");
    if copied.is_some() {
        o.push_str(" <span class=\"badge copy\">copied</span>");
    }
    o.push_str("</td><td class=\"fields\">");
    if let Some(Value::Object(input)) = r.get("input") {
        for (k, v) in input {
            o.push_str("<div><b>");
            escape_into(o, k);
            o.push_str("</b> ");
            escape_into(o, &text_of(Some(v)));
            o.push_str("</div>");
        }
    }
    o.push_str("</td><td class=\"out\">");
    if let Some(c) = r.get("completion").and_then(Value::as_str) {
        o.push_str("<div class=\"text\">");
        escape_into(o, c);
        o.push_str("</div>");
    }
    if let Some(e) = r.get("error").filter(|e| e.is_object()) {
        o.push_str("<div class=\"err\">");
        escape_into(o, &text_of(e.get("kind")));
        if let Some(s) = e.get("status").and_then(Value::as_u64) {
            let _ = write!(o, " (HTTP {s})");
        }
        o.push_str(": ");
        escape_into(o, &text_of(e.get("message")));
        o.push_str("</div>");
    }
    if let Some(f) = r
        .get("finish_reason")
        .and_then(Value::as_str)
        .filter(|f| *f != "stop")
    {
        o.push_str("<div class=\"note\">finish reason: ");
        escape_into(o, f);
        o.push_str("</div>");
    }
    if let Some(c) = &copied {
        let _ = write!(
            o,
            "<div class=\"note\">copied from row {}",
            text_of(c.get("row"))
        );
        if let Some(id) = c.get("id").and_then(Value::as_str) {
            o.push_str(" (");
            escape_into(o, id);
            o.push(')');
        }
        o.push_str(": the same request, not sent again</div>");
    }
    let usage = r.get("usage").cloned().unwrap_or(Value::Null);
    let cost = r.get("cost_usd").and_then(Value::as_f64);
    let unconfirmed = r.get("unconfirmed_usd").and_then(Value::as_f64);
    let attempts = num(&r, "attempts");
    let latency = num(&r, "latency_ms");
    for k in OWN_FIELDS {
        r.remove(*k);
    }
    for (k, v) in &r {
        o.push_str("<div class=\"extra\"><b>");
        escape_into(o, k);
        o.push_str("</b>");
        match v {
            Value::String(s) => {
                o.push(' ');
                escape_into(o, s);
            }
            v => {
                o.push_str("<pre>");
                escape_into(o, &serde_json::to_string_pretty(v).unwrap_or_default());
                o.push_str("</pre>");
            }
        }
        o.push_str("</div>");
    }
    o.push_str("</td><td class=\"n\">");
    let (p, c) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    );
    if let (Some(p), Some(c)) = (p, c) {
        let _ = write!(
            o,
            "<span title=\"prompt + completion{}\">{} + {}</span>",
            if usage["estimated"] == Value::Bool(true) {
                " (estimated: the server sent no usage)"
            } else {
                ""
            },
            group(p),
            group(c)
        );
    }
    o.push_str("</td><td class=\"n\">");
    match cost {
        Some(c) => o.push_str(&usd(c)),
        None if ok && copied.is_none() => o.push_str("unknown"),
        None => {}
    }
    if let Some(u) = unconfirmed {
        let _ = write!(
            o,
            "<div class=\"note\" title=\"attempts that may have been billed without an answer, at worst case\">+{} unconfirmed</div>",
            usd(u)
        );
    }
    o.push_str("</td><td class=\"n\">");
    if let (Some(ms), Some(a)) = (latency, attempts) {
        if a > 0 {
            let _ = write!(o, "{} ms", group(ms));
        }
    }
    o.push_str("</td><td class=\"n\">");
    if let Some(a) = attempts {
        let _ = write!(o, "{a}");
    }
    o.push_str("</td></tr>\n");
}

/// A value as text: strings as they are, anything else as compact JSON.
fn text_of(v: Option<&Value>) -> Cow<'_, str> {
    match v {
        None | Some(Value::Null) => Cow::Borrowed(""),
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(v) => Cow::Owned(v.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// The page

struct Page<'a> {
    output: &'a Path,
    tally: &'a Tally,
    summary: Option<&'a Summary>,
    stale: u64,
    table_rows: u64,
    table_cap: usize,
}

impl Page<'_> {
    /// Everything before the table's rows.
    fn head(&self) -> String {
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

    fn summary_section(&self, o: &mut String) {
        let t = self.tally;
        let s = self.summary;
        if let Some(why) = s.and_then(|s| s.stopped.as_deref()) {
            o.push_str("<div class=\"stopped\"><b>The last run stopped early.</b> ");
            escape_into(o, why);
            o.push_str("</div>\n");
        }
        o.push_str("<section class=\"cards\">\n");
        // The output, from its records.
        let mut rows = vec![
            ("ok", group(t.ok)),
            (
                "failed",
                if t.failed > 0 {
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
                } else {
                    "0".into()
                },
            ),
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
        if let Some(p) = s.map(|s| s.rows_pending).filter(|&p| p > 0) {
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

        let mut tokens = vec![
            ("prompt", group(t.prompt_tokens)),
            ("completion", group(t.completion_tokens)),
            ("total", group(t.prompt_tokens + t.completion_tokens)),
        ];
        if let Some(s) = s.filter(|s| s.cached_tokens > 0 || s.reasoning_tokens > 0) {
            tokens.push((
                "cached / reasoning (last run)",
                format!("{} / {}", group(s.cached_tokens), group(s.reasoning_tokens)),
            ));
        }
        card(o, "Tokens", "in this output", &tokens);

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
        if let Some(s) = s {
            match (s.spent_usd, s.budget_usd) {
                (Some(sp), Some(b)) => {
                    cost.push(("spent / budget", format!("{} / {}", usd(sp), usd(b))))
                }
                (Some(sp), None) => cost.push(("spent across runs", usd(sp))),
                _ => {}
            }
        }
        card(o, "Cost", "USD", &cost);

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

        match s {
            Some(s) => {
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
            None => {
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
        }
        o.push_str("</section>\n");
    }

    fn charts_section(&self, o: &mut String) {
        let t = self.tally;
        o.push_str("<section class=\"charts\">\n");
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
        let errors: Vec<(String, u64)> = {
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
        };
        figure(
            o,
            "Errors by kind",
            &format!("failed rows: {}", group(t.failed)),
            &hbars_svg(&errors),
        );
        o.push_str("</section>\n");
    }

    fn table_open(&self, o: &mut String) {
        let t = self.tally;
        let note = if self.table_rows < t.records {
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
    fn tail(&self) -> String {
        let t = self.tally;
        let data = serde_json::json!({
            "output": self.output.display().to_string(),
            "records": t.records,
            "ok": t.ok,
            "failed": t.failed,
            "stale": self.stale,
            "table_rows": self.table_rows,
            "table_cap": self.table_cap,
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

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn usd(v: f64) -> String {
    if v == 0.0 {
        "$0".into()
    } else if v.abs() >= 100.0 {
        format!("${v:.2}")
    } else if v.abs() >= 0.01 {
        format!("${v:.4}")
    } else {
        format!("${v:.6}")
    }
}

/// A cost on an axis: as few digits as the tick needs ("$0.0003", "$1.50", "$120").
fn usd_tick(v: f64) -> String {
    if v >= 100.0 {
        format!("${v:.0}")
    } else if v >= 1.0 {
        format!("${v:.2}")
    } else {
        let s = format!("{v:.8}");
        format!("${}", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

fn duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.2} s")
    } else if s < 3600.0 {
        format!("{}m {:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h {:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Charts: inline SVG, drawn here

/// Points in a line chart at most, and bars in a histogram about.
const CHART_POINTS: usize = 600;
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

fn empty_svg(text: &str) -> String {
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

fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
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

fn histogram_svg(h: &Histogram<u64>, unit: &str, what: &str) -> String {
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
fn hbars_svg(items: &[(String, u64)]) -> String {
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

/// A column of a chart over time: a bin of finished rows, or a break where nothing finished
/// for a long while (between two runs, say), drawn narrow so a week's pause does not flatten
/// the runs on either side.
#[derive(Debug, Clone, PartialEq)]
enum Col {
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
fn time_columns(t: &Tally) -> Vec<Col> {
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
fn cols_minutes(cols: &[Col]) -> f64 {
    cols.iter()
        .find_map(|c| match c {
            Col::Data { minutes, .. } => Some(*minutes),
            Col::Break { .. } => None,
        })
        .unwrap_or(1.0)
}

#[derive(Clone, Copy, PartialEq)]
enum Series {
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
fn gap_text(ms: i64) -> String {
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

fn timeseries_svg(cols: &[Col], series: Series) -> String {
    // A break is as wide as two data columns.
    let units: f64 = cols
        .iter()
        .map(|c| match c {
            Col::Data { .. } => 1.0,
            Col::Break { .. } => 2.0,
        })
        .sum();
    let plot_w = W - LEFT - RIGHT;
    let cw = plot_w / units.max(1.0);
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
    let base = H - BOTTOM;
    let y_of = |v: f64| base - (H - TOP - BOTTOM) * v / top;
    let mut x = LEFT;
    let mut vi = 0;
    let mut points = String::new();
    let mut last_y = base;
    let mut days = std::collections::BTreeSet::new();
    let mut labels: Vec<(f64, String)> = Vec::new();
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
                days.insert(day(*start_ms));
                if i == 0 || matches!(cols[i - 1], Col::Break { .. }) {
                    labels.push((x, clock(*start_ms, *minutes)));
                }
                let end = start_ms + (minutes * 60_000.0) as i64;
                let when = format!("{}–{}", clock(*start_ms, *minutes), clock(end, *minutes));
                match series {
                    Series::RequestsPerMinute => {
                        let y = y_of(v);
                        let _ = write!(
                            o,
                            "<rect class=\"bar\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{when} UTC: {} requests, {} rows finished</title></rect>",
                            x,
                            (cw - 0.5).max(0.5),
                            base - y,
                            group(*requests),
                            group(*rows)
                        );
                    }
                    Series::CumulativeCost => {
                        let y = y_of(v);
                        if points.is_empty() {
                            let _ = write!(points, "{x:.1},{base:.1} ");
                        }
                        let _ = write!(points, "{x:.1},{last_y:.1} {:.1},{y:.1} ", x + cw);
                        last_y = y;
                        let _ = write!(
                            o,
                            "<rect class=\"hit\" x=\"{x:.1}\" y=\"{TOP}\" width=\"{cw:.2}\" height=\"{}\"><title>{when} UTC: {} in this bin, {} in all</title></rect>",
                            H - TOP - BOTTOM,
                            usd(*cost),
                            usd(v)
                        );
                    }
                }
                x += cw;
            }
            Col::Break { from_ms, to_ms } => {
                let mid = x + cw;
                let _ = write!(
                    o,
                    "<line class=\"gap\" x1=\"{mid:.1}\" x2=\"{mid:.1}\" y1=\"{TOP}\" y2=\"{base}\"><title>nothing finished for {} ({} to {} UTC)</title></line>",
                    gap_text(to_ms - from_ms),
                    format_timestamp(*from_ms)[..16].replace('T', " "),
                    format_timestamp(*to_ms)[..16].replace('T', " ")
                );
                if series == Series::CumulativeCost && !points.is_empty() {
                    let _ = write!(points, "{:.1},{last_y:.1} ", x + 2.0 * cw);
                }
                x += 2.0 * cw;
            }
        }
    }
    if series == Series::CumulativeCost {
        let _ = write!(
            o,
            "<polyline class=\"line\" points=\"{}\"/>",
            points.trim_end()
        );
    }
    if let Some(Col::Data {
        start_ms, minutes, ..
    }) = cols.last()
    {
        let end = start_ms + (minutes * 60_000.0) as i64;
        labels.push((W - RIGHT, clock(end, *minutes)));
    }
    // Labels closer than ~40 px to the one before are dropped.
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
    let span = match (days.first(), days.last()) {
        (Some(a), Some(b)) if a != b => format!("{a} to {b}, UTC"),
        (Some(a), _) => format!("{a}, UTC"),
        _ => String::new(),
    };
    let _ = write!(
        o,
        "<text class=\"axis\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text></svg>",
        LEFT + plot_w / 2.0,
        H - 4.0,
        escape(&span)
    );
    o
}

/// Cumulative cost against the record's position, for outputs whose records carry no time.
fn cost_by_record_svg(points: &[(u64, f64)]) -> String {
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

// ---------------------------------------------------------------------------------------------
// Inline style and script

/// The CSP hash of `JS`: base64 of its SHA-256.
fn script_hash() -> String {
    use sha2::Digest;
    base64(&sha2::Sha256::digest(JS.as_bytes()))
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_text_and_attributes() {
        assert_eq!(escape("plain"), "plain");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape(r#"<script>alert(1)</script> "a" & 'b'"#),
            "&lt;script&gt;alert(1)&lt;/script&gt; &quot;a&quot; &amp; &#39;b&#39;"
        );
        assert_eq!(escape("é<ü>"), "é&lt;ü&gt;");
    }

    #[test]
    fn json_in_a_script_element_cannot_close_it() {
        let v =
            serde_json::json!({"m": "</script><script>alert(1)</script><!-- & \u{2028}\u{2029}"});
        let s = json_for_script(&v);
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!s.contains(bad), "{s}");
        }
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v, "still the same JSON");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(usd(0.0), "$0");
        assert_eq!(usd(0.000116), "$0.000116");
        assert_eq!(usd(12.5), "$12.5000");
        assert_eq!(usd_tick(0.0), "$0");
        assert_eq!(usd_tick(0.0003), "$0.0003");
        assert_eq!(usd_tick(2.5), "$2.50");
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

    #[test]
    fn a_table_row_escapes_every_field_and_shows_unknown_ones() {
        let rec: Map<String, Value> = serde_json::from_str(
            r#"{"row":3,"id":"<b>x</b>","status":"error","input":{"t\"<":"<script>alert(1)</script>"},
                "completion":null,"error":{"kind":"bad_request","status":400,"message":"\"><img src=x onerror=alert(1)>"},
                "attempts":1,"latency_ms":12,"data":{"k":"</pre><script>"},"variants":["<i>a</i>"]}"#,
        )
        .unwrap();
        let mut o = String::new();
        table_row(&mut o, rec);
        assert!(!o.contains("<script"), "{o}");
        assert!(!o.contains("<img"), "{o}");
        assert!(!o.contains("<b>x"), "{o}");
        assert!(o.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(o.contains("data-status=\"failed\""));
        assert!(o.contains("<b>data</b><pre>") && o.contains("<b>variants</b><pre>"));
        assert!(o.contains("bad_request (HTTP 400)"));
    }
}
