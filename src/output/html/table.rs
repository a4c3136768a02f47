//! The table: one HTML row per record it holds, written to the spool as the records stream
//! past.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;

use serde_json::{Map, Value};

use super::text::{escape_into, group, usd};
use crate::ledger::journal;
use crate::ledger::record::Status;

/// Table rows, written as HTML to the spool as the records stream past.
pub(crate) struct Table<W: Write> {
    pub(crate) out: W,
    cap: usize,
    failed_cap: usize,
    seen: u64,
    failed_past_cap: u64,
    pub(crate) rows: u64,
    /// Failed rows past both caps: counted, not shown.
    pub(crate) failed_left: u64,
    buf: String,
}

impl<W: Write> Table<W> {
    pub(crate) fn new(out: W, cap: usize, failed_cap: usize) -> Self {
        Table {
            out,
            cap,
            failed_cap,
            seen: 0,
            failed_past_cap: 0,
            rows: 0,
            failed_left: 0,
            buf: String::with_capacity(4096),
        }
    }

    /// The first `cap` records, and the first `failed_cap` failed ones after them.
    pub(crate) fn offer(&mut self, l: &journal::Line, bytes: &[u8]) -> std::io::Result<()> {
        self.seen += 1;
        if self.seen > self.cap as u64 {
            if l.status != Status::Error {
                return Ok(());
            }
            self.failed_past_cap += 1;
            if self.failed_past_cap > self.failed_cap as u64 {
                self.failed_left += 1;
                return Ok(());
            }
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

/// One record as a table row: the figures have their own cells; the completion, the error
/// and every field the table does not know share the output cell.
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
    input_cell(o, r.get("input"));
    o.push_str("</td><td class=\"out\">");
    outcome(o, &r);
    if let Some(c) = &copied {
        copied_note(o, c);
    }
    // Taken before the table's own fields are dropped, so that what is left is the rest.
    let usage = r.get("usage").cloned().unwrap_or(Value::Null);
    let cost = r.get("cost_usd").and_then(Value::as_f64);
    let unconfirmed = r.get("unconfirmed_usd").and_then(Value::as_f64);
    let attempts = num(&r, "attempts");
    let latency = num(&r, "latency_ms");
    for k in OWN_FIELDS {
        r.remove(*k);
    }
    other_fields(o, &r);
    o.push_str("</td><td class=\"n\">");
    tokens_cell(o, &usage);
    o.push_str("</td><td class=\"n\">");
    cost_cell(o, cost, unconfirmed, ok && copied.is_none());
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

/// The row's input fields, one a line.
fn input_cell(o: &mut String, input: Option<&Value>) {
    if let Some(Value::Object(input)) = input {
        for (k, v) in input {
            o.push_str("<div><b>");
            escape_into(o, k);
            o.push_str("</b> ");
            escape_into(o, &text_of(Some(v)));
            o.push_str("</div>");
        }
    }
}

/// What came back: the completion, the error, and a finish reason other than `stop`.
fn outcome(o: &mut String, r: &Map<String, Value>) {
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
}

/// A copy's source row: its answer is that row's, paid for once.
fn copied_note(o: &mut String, c: &Value) {
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

/// The fields not in `OWN_FIELDS`: strings as text, anything else as pretty JSON.
fn other_fields(o: &mut String, r: &Map<String, Value>) {
    for (k, v) in r {
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
}

/// Prompt + completion tokens, marked when they were counted here rather than sent.
fn tokens_cell(o: &mut String, usage: &Value) {
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
}

/// The row's cost, and what it may have cost unanswered; `unknown` for a row sent and
/// answered with no price: its cost is not zero, only not known.
fn cost_cell(o: &mut String, cost: Option<f64>, unconfirmed: Option<f64>, sent_ok: bool) {
    match cost {
        Some(c) => o.push_str(&usd(c)),
        None if sent_ok => o.push_str("unknown"),
        None => {}
    }
    if let Some(u) = unconfirmed {
        let _ = write!(
            o,
            "<div class=\"note\" title=\"attempts that may have been billed without an answer, at worst case\">+{} unconfirmed</div>",
            usd(u)
        );
    }
}

/// A value as text: strings as they are, anything else as compact JSON.
fn text_of(v: Option<&Value>) -> Cow<'_, str> {
    match v {
        None | Some(Value::Null) => Cow::Borrowed(""),
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(v) => Cow::Owned(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
