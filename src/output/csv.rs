//! The CSV export: one line per record of the compacted JSONL output, in its order, under a
//! header that names every input column and never the same column twice.
//!
//! One pass over the records, whoever has them (`export_csv` reads the output; `merge` hands
//! over each record as it merges): each record's cells go to a spool beside the CSV, with the
//! columns known so far; `finish` then writes the header (which only every record together
//! decides: a JSONL input's columns, the data's keys, whether any record has variants) and the
//! spooled lines under it, padded to the final columns, into the CSV by the atomic replace.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::Error;
use crate::ledger::files::Pending;
use crate::ledger::journal::{io_err, parse_line, Line};
use crate::ledger::record::Status;

/// How the cells are written.
#[derive(Debug, Clone, Default)]
pub struct CsvOptions {
    /// Prefix text cells a spreadsheet would run as a formula with `'`: completions come from a
    /// model that the input data can steer (OWASP's CSV-injection advice).
    pub escape_formulas: bool,
    /// The structured output's columns, in order (the schema's top-level properties); `None`:
    /// the keys of the records' `data`, in first-seen order.
    pub data_columns: Option<Vec<String>>,
}

/// The columns after the input's (and the data's), in order.
const OUTPUT_COLUMNS: [&str; 6] = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "status",
    "error",
];

/// Writes the CSV export of the (compacted, input-ordered) JSONL output `jsonl` to `csv_path`.
/// `input_columns`: the CSV input's header in order; `None` for JSONL input, whose columns are
/// then the union of the records' `input` keys in first-seen order. Returns the rows written.
pub fn export_csv(
    jsonl: &Path,
    csv_path: &Path,
    input_columns: Option<&[String]>,
    opts: &CsvOptions,
) -> Result<u64, Error> {
    std::fs::metadata(jsonl).map_err(|e| io_err(jsonl, e))?;
    let mut w = CsvWriter::create(csv_path, input_columns, opts)?;
    crate::ledger::journal::for_each_line(jsonl, |_, n, bytes| {
        let bad = |e: String| Error::Input {
            path: jsonl.to_path_buf(),
            message: format!("line {n}: not an output record: {e}"),
        };
        match parse_line(bytes).map_err(bad)? {
            Some(l) => w.add(&CsvRecord::from(&l)).map_err(bad),
            None => Ok(()),
        }
    })?;
    w.finish()
}

/// What the CSV takes of a record: its parts as JSON text, as the line has them, and its
/// figures. From a parsed line (`From<&Line>`), or from a line's byte ranges.
#[derive(Debug, Default)]
pub struct CsvRecord<'a> {
    /// JSON: an object, or null.
    pub input: Option<&'a str>,
    /// JSON: a string, or null.
    pub completion: Option<&'a str>,
    /// JSON: any value (only an object's members have columns).
    pub data: Option<&'a str>,
    /// JSON: an array of choices, or null.
    pub variants: Option<&'a str>,
    /// Prompt, completion and total tokens.
    pub usage: Option<[u64; 3]>,
    pub cost_usd: Option<f64>,
    pub ok: bool,
    /// The error's message (text, not JSON).
    pub error: Option<&'a str>,
}

impl<'a> From<&'a Line<'_>> for CsvRecord<'a> {
    fn from(l: &'a Line<'_>) -> CsvRecord<'a> {
        CsvRecord {
            input: l.input.map(RawValue::get),
            completion: l.completion.map(RawValue::get),
            data: l.data.map(RawValue::get),
            variants: l.variants.map(RawValue::get),
            usage: l
                .usage
                .as_ref()
                .map(|u| [u.prompt_tokens, u.completion_tokens, u.total_tokens]),
            cost_usd: l.cost_usd,
            ok: l.status == Status::Ok,
            error: l.error.as_ref().map(|e| e.message.as_ref()),
        }
    }
}

/// The CSV of records given one at a time, in output order (see the module doc).
pub struct CsvWriter {
    path: PathBuf,
    escape: bool,
    inputs: Columns,
    data: Columns,
    /// Some record has variants: a `variant` column, one line per variant.
    variants: bool,
    body: Body,
    /// The columns the body's lines have, from the line where they changed on.
    layouts: Vec<(u64, Layout)>,
    records: u64,
    scratch: Vec<u8>,
    cost: Cost,
}

/// The last cost cell written: rows with the same usage cost the same, and formatting a
/// float to 8 places is the dearest part of a line.
#[derive(Default)]
struct Cost {
    bits: Option<u64>,
    text: String,
}

impl Cost {
    fn text(&mut self, c: f64) -> &str {
        if self.bits != Some(c.to_bits()) {
            self.text.clear();
            let _ = std::fmt::Write::write_fmt(&mut self.text, format_args!("{c:.8}"));
            self.bits = Some(c.to_bits());
        }
        &self.text
    }
}

/// Which columns a body line has: inputs, then a `variant` column or not, the completion,
/// data, and the output columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    inputs: usize,
    data: usize,
    variants: bool,
}

impl CsvWriter {
    /// `input_columns` and the data columns as `export_csv` takes them.
    pub fn create(
        csv_path: &Path,
        input_columns: Option<&[String]>,
        opts: &CsvOptions,
    ) -> Result<CsvWriter, Error> {
        if let Some(dir) = csv_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        Ok(CsvWriter {
            path: csv_path.to_path_buf(),
            escape: opts.escape_formulas,
            inputs: Columns::new(input_columns),
            data: Columns::new(opts.data_columns.as_deref()),
            variants: false,
            body: Body::create(csv_path)?,
            layouts: Vec::new(),
            records: 0,
            scratch: Vec::new(),
            cost: Cost::default(),
        })
    }

    fn layout(&self) -> Layout {
        Layout {
            inputs: self.inputs.names.len(),
            data: self.data.names.len(),
            variants: self.variants,
        }
    }

    /// One record's line (or one line per variant). `Err`: why the record cannot be read, or
    /// a write that failed.
    pub fn add(&mut self, l: &CsvRecord) -> Result<(), String> {
        let inputs = match l.input {
            Some(raw) => Pairs::of(raw)?,
            None => Pairs::default(),
        };
        self.inputs.learn(&inputs);
        let data = Pairs::of_object(l.data)?;
        self.data.learn(&data);
        let variants: Vec<VariantCells> = match l.variants {
            Some(raw) => serde_json::from_str::<Option<_>>(raw)
                .map_err(|e| format!("variants: {e}"))?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        self.variants |= !variants.is_empty();
        if !self.body.headed {
            let header = self.header();
            let path = &self.path;
            self.body
                .header(&header)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        let layout = self.layout();
        if self.layouts.last().is_none_or(|(_, last)| *last != layout) {
            self.layouts.push((self.body.lines, layout));
        }
        if variants.is_empty() {
            let completion = match l.completion {
                Some(raw) => text(raw)?,
                None => Cow::Borrowed(""),
            };
            self.put(l, &inputs, None, &completion, &data)
        } else {
            for (i, v) in variants.iter().enumerate() {
                let data = Pairs::of_object(v.data.map(RawValue::get))?;
                self.put(l, &inputs, Some(i), &v.completion, &data)?;
            }
            Ok(())
        }?;
        self.records += 1;
        Ok(())
    }

    /// A CSV line, with the columns known so far. Usage and cost are the request's: on the
    /// first variant's line only, so the column sums to what was paid.
    fn put(
        &mut self,
        l: &CsvRecord,
        inputs: &Pairs,
        variant: Option<usize>,
        completion: &str,
        data: &Pairs,
    ) -> Result<(), String> {
        let (esc, s) = (self.escape, &mut self.scratch);
        let w = &mut self.body.w;
        let path = &self.path;
        let io = |e: csv::Error| format!("writing {}: {e}", path.display());
        for c in &self.inputs.names {
            field(w, s, inputs.text(c)?.as_bytes(), esc).map_err(io)?;
        }
        if self.variants {
            number(w, Some(variant.unwrap_or(0) as u64 + 1)).map_err(io)?;
        }
        field(w, s, completion.as_bytes(), esc).map_err(io)?;
        for c in &self.data.names {
            field(w, s, data.text(c)?.as_bytes(), esc).map_err(io)?;
        }
        let first = variant.is_none_or(|i| i == 0);
        let usage = l.usage.filter(|_| first);
        for i in 0..3 {
            number(w, usage.map(|u| u[i])).map_err(io)?;
        }
        match l.cost_usd.filter(|_| first) {
            Some(c) => w.write_field(self.cost.text(c)).map_err(io)?,
            None => w.write_field(b"").map_err(io)?,
        }
        w.write_field(if l.ok { "ok" } else { "error" })
            .map_err(io)?;
        field(w, s, l.error.unwrap_or("").as_bytes(), esc).map_err(io)?;
        self.body.end_line().map_err(io)
    }

    /// The header as the columns known so far make it.
    fn header(&self) -> Vec<String> {
        let mut names: Vec<&str> = Vec::new();
        if self.variants {
            names.push("variant");
        }
        names.push("completion");
        names.extend(self.data.names.iter().map(String::as_str));
        names.extend(OUTPUT_COLUMNS);
        let mut header = self.inputs.names.clone();
        header.extend(output_columns(&self.inputs.names, &names));
        header
    }

    /// The CSV in place (atomically). Returns the records.
    pub fn finish(self) -> Result<u64, Error> {
        let (csv, records) = self.prepare()?;
        csv.commit()?;
        Ok(records)
    }

    /// `finish` but for its last step: the CSV written and on disk, to be put in place by
    /// the `Pending`'s `commit` (when what goes with it is ready too). The lines are already
    /// there under the header the first record gave, unless later records brought columns:
    /// then they are laid out again, under the final header, into a second file.
    pub fn prepare(mut self) -> Result<(Pending, u64), Error> {
        let last = self.layout();
        let io = |e: csv::Error| io_err(&self.path, e.into());
        if !self.body.headed {
            let header = self.header();
            self.body.header(&header).map_err(io)?;
        }
        let header = self.header();
        let mut file = self.body.into_file(&self.path)?;
        if self.layouts.iter().any(|(_, l)| *l != last) {
            let mut again = Pending::create_as(&self.path, ".columns.tmp")?;
            let mut w = csv::Writer::from_writer(&mut again);
            w.write_record(&header).map_err(io)?;
            file.flush().map_err(|e| io_err(file.tmp(), e))?;
            relayout(file.tmp(), &mut w, &self.layouts, last)?;
            w.flush().map_err(|e| io_err(&self.path, e))?;
            drop(w);
            file = again;
        }
        file.sync()?;
        Ok((file, self.records))
    }
}

/// The lines of the CSV at `path` (under the first record's header) written before the last
/// columns were known, padded to them.
fn relayout<W: Write>(
    path: &Path,
    w: &mut csv::Writer<W>,
    layouts: &[(u64, Layout)],
    last: Layout,
) -> Result<(), Error> {
    let bad = |e: csv::Error| io_err(path, e.into());
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .buffer_capacity(256 * 1024)
        .from_path(path)
        .map_err(bad)?;
    let mut rec = csv::ByteRecord::new();
    let (mut line, mut at) = (0u64, 0usize);
    while r.read_byte_record(&mut rec).map_err(bad)? {
        while layouts.get(at + 1).is_some_and(|(from, _)| *from <= line) {
            at += 1;
        }
        let l = layouts[at].1;
        let f = |i: usize| rec.get(i).unwrap_or(b"");
        let mut fields: Vec<&[u8]> = (0..l.inputs).map(f).collect();
        fields.resize(last.inputs, b"");
        let mut i = l.inputs;
        if last.variants {
            fields.push(if l.variants { f(i) } else { b"1" });
        }
        i += usize::from(l.variants);
        fields.push(f(i));
        fields.extend((i + 1..i + 1 + l.data).map(f));
        fields.resize(fields.len() + last.data - l.data, b"");
        fields.extend((i + 1 + l.data..rec.len()).map(f));
        w.write_record(&fields).map_err(bad)?;
        line += 1;
    }
    Ok(())
}

/// A text cell; escaped (`escape`), one a spreadsheet would evaluate (`=`, `+`, `-`, `@`, tab
/// or CR first) is made text by a leading `'`.
fn field<W: Write>(
    w: &mut csv::Writer<W>,
    scratch: &mut Vec<u8>,
    s: &[u8],
    escape: bool,
) -> csv::Result<()> {
    if escape && matches!(s.first(), Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')) {
        scratch.clear();
        scratch.push(b'\'');
        scratch.extend_from_slice(s);
        w.write_field(&*scratch)
    } else {
        w.write_field(s)
    }
}

/// A number cell (empty for none): never escaped.
fn number<W: Write>(w: &mut csv::Writer<W>, n: Option<u64>) -> csv::Result<()> {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    if let Some(mut n) = n {
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
    }
    w.write_field(&digits[at..])
}

/// Input or data columns: given (the CSV input's header, the schema's properties), or the
/// union of the records' keys in first-seen order, growing as records come.
struct Columns {
    names: Vec<String>,
    seen: Option<HashSet<String>>,
}

impl Columns {
    fn new(given: Option<&[String]>) -> Columns {
        match given {
            Some(names) => Columns {
                names: names.to_vec(),
                seen: None,
            },
            None => Columns {
                names: Vec::new(),
                seen: Some(HashSet::new()),
            },
        }
    }

    fn learn(&mut self, pairs: &Pairs) {
        let Some(seen) = &mut self.seen else {
            return;
        };
        // Most records have the columns of the one before, in its order.
        let known = pairs.0.len() <= self.names.len()
            && pairs.0.iter().zip(&self.names).all(|((k, _), n)| k == n);
        if known {
            return;
        }
        for (k, _) in &pairs.0 {
            if !seen.contains(k.as_ref()) {
                seen.insert(k.to_string());
                self.names.push(k.to_string());
            }
        }
    }
}

/// A JSON object's members as written, borrowed from the line.
#[derive(Default)]
struct Pairs<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'a> Pairs<'a> {
    fn of(raw: &'a str) -> Result<Pairs<'a>, String> {
        serde_json::from_str::<Option<Pairs>>(raw)
            .map(Option::unwrap_or_default)
            .map_err(|e| format!("input: {e}"))
    }

    /// `data`'s members; none when it is not an object.
    fn of_object(raw: Option<&'a str>) -> Result<Pairs<'a>, String> {
        match raw {
            Some(r) if r.trim_start().starts_with('{') => {
                serde_json::from_str(r).map_err(|e| format!("data: {e}"))
            }
            _ => Ok(Pairs::default()),
        }
    }

    /// The cell of member `key` (the last, if the object names it twice, as a JSON map keeps).
    fn text(&self, key: &str) -> Result<Cow<'a, str>, String> {
        match self.0.iter().rev().find(|(k, _)| k == key) {
            Some((_, v)) => text(v),
            None => Ok(Cow::Borrowed("")),
        }
    }
}

impl<'de> Deserialize<'de> for Pairs<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Pairs<'de>, A::Error> {
                let mut v = Vec::new();
                while let Some((Text(k), raw)) = m.next_entry::<Text<'de>, &'de RawValue>()? {
                    v.push((k, raw.get()));
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A JSON string, borrowed when it has no escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// A value's cell: a string's text, nothing for null, any other value as compact JSON.
fn text(raw: &str) -> Result<Cow<'_, str>, String> {
    let t = raw.trim_start();
    let bad = |e: serde_json::Error| e.to_string();
    match t.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<Text>(t).map(|s| s.0).map_err(bad),
        Some(b'n') => Ok(Cow::Borrowed("")),
        _ => Ok(Cow::Owned(
            serde_json::from_str::<Value>(t).map_err(bad)?.to_string(),
        )),
    }
}

/// One choice of a record, as the CSV needs it.
#[derive(Deserialize)]
struct VariantCells<'a> {
    #[serde(borrow)]
    completion: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// The CSV being written: the header the first record gave, then its lines, into the
/// replacement of the CSV.
struct Body {
    w: csv::Writer<Pending>,
    /// The lines written, the header not counted.
    lines: u64,
    headed: bool,
}

impl Body {
    fn create(path: &Path) -> Result<Body, Error> {
        Ok(Body {
            w: csv::WriterBuilder::new()
                .flexible(true)
                .buffer_capacity(256 * 1024)
                .from_writer(Pending::create(path)?),
            lines: 0,
            headed: false,
        })
    }

    fn header(&mut self, header: &[String]) -> csv::Result<()> {
        self.w.write_record(header)?;
        self.headed = true;
        Ok(())
    }

    fn end_line(&mut self) -> csv::Result<()> {
        self.w.write_record(None::<&[u8]>)?;
        self.lines += 1;
        Ok(())
    }

    /// The file, everything written to it.
    fn into_file(self, csv: &Path) -> Result<Pending, Error> {
        self.w.into_inner().map_err(|e| io_err(csv, e.into_error()))
    }
}

/// The output columns' names; one that an input column already has becomes
/// `promptmill_NAME` (then `_2`, `_3`…), so no header names two columns alike.
fn output_columns(inputs: &[String], names: &[&str]) -> Vec<String> {
    let mut taken: HashSet<String> = inputs.iter().cloned().collect();
    let mut out = Vec::with_capacity(names.len());
    for &name in names {
        let mut chosen = name.to_string();
        if taken.contains(&chosen) {
            let base = format!("promptmill_{name}");
            chosen = base.clone();
            let mut k = 2;
            while taken.contains(&chosen) {
                chosen = format!("{base}_{k}");
                k += 1;
            }
            tracing::warn!(
                "the input has a column named `{name}`; the CSV export's output column \
                 `{name}` is named `{chosen}`"
            );
        }
        taken.insert(chosen.clone());
        out.push(chosen);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(row: u64, input: Value, completion: &str) -> String {
        json!({
            "row": row, "id": row.to_string(), "status": "ok", "input": input,
            "completion": completion, "finish_reason": "stop", "model": "m",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            "cost_usd": 0.25, "attempts": 1, "latency_ms": 7, "fingerprint": "f", "error": null
        })
        .to_string()
    }

    /// An unreadable row's record: no input, an `input` error.
    fn unreadable(row: u64, message: &str) -> String {
        json!({
            "row": row, "id": row.to_string(), "status": "error", "input": {},
            "completion": null, "finish_reason": null, "model": null, "usage": null,
            "cost_usd": null, "attempts": 0, "latency_ms": 0, "fingerprint": null,
            "error": {"kind": "input", "status": null, "message": message}
        })
        .to_string()
    }

    /// Exports `lines` and reads the CSV back as rows of cells, the header first.
    fn export(
        lines: &[String],
        inputs: Option<&[String]>,
        escape_formulas: bool,
    ) -> Result<(u64, Vec<Vec<String>>), Error> {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("out.jsonl");
        std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
        let csv_path = dir.path().join("out.csv");
        let n = export_csv(
            &jsonl,
            &csv_path,
            inputs,
            &CsvOptions {
                escape_formulas,
                data_columns: None,
            },
        )?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(&csv_path)
            .unwrap();
        let rows = rdr
            .records()
            .map(|r| r.unwrap().iter().map(String::from).collect())
            .collect();
        Ok((n, rows))
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_header_is_the_csv_inputs_columns_in_order() {
        let header = strings(&["b", "a", "never_in_a_record"]);
        let lines = [ok(1, json!({"a": "1", "b": "2"}), "x")];
        let (n, rows) = export(&lines, Some(&header), false).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            rows[0],
            strings(&[
                "b",
                "a",
                "never_in_a_record",
                "completion",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "cost_usd",
                "status",
                "error"
            ])
        );
        assert_eq!(
            rows[1],
            strings(&["2", "1", "", "x", "3", "2", "5", "0.25000000", "ok", ""])
        );
    }

    #[test]
    fn an_unreadable_first_jsonl_row_does_not_drop_the_input_columns() {
        let lines = [
            unreadable(1, "in.jsonl: line 1 (row 1): invalid JSON"),
            ok(2, json!({"a": "x", "n": 5}), "c2"),
            ok(3, json!({"b": null, "a": "y", "o": {"k": [1, 2]}}), "c3"),
        ];
        let (n, rows) = export(&lines, None, false).unwrap();
        assert_eq!(n, 3, "every record has its line");
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0][..4], strings(&["a", "n", "b", "o"]));
        assert_eq!(
            rows[1],
            strings(&[
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "error",
                "in.jsonl: line 1 (row 1): invalid JSON"
            ])
        );
        assert_eq!(rows[2][..5], strings(&["x", "5", "", "", "c2"]));
        assert_eq!(
            rows[3][..5],
            strings(&["y", "", "", r#"{"k":[1,2]}"#, "c3"])
        );
    }

    #[test]
    fn an_output_column_named_like_an_input_column_is_renamed() {
        let header = strings(&["completion", "promptmill_completion", "status"]);
        let lines = [ok(
            1,
            json!({"completion": "in", "promptmill_completion": "in2", "status": "s"}),
            "out",
        )];
        let (_, rows) = export(&lines, Some(&header), false).unwrap();
        assert_eq!(
            rows[0],
            strings(&[
                "completion",
                "promptmill_completion",
                "status",
                "promptmill_completion_2",
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "cost_usd",
                "promptmill_status",
                "error"
            ])
        );
        let unique: HashSet<&String> = rows[0].iter().collect();
        assert_eq!(unique.len(), rows[0].len());
        assert_eq!(rows[1][..4], strings(&["in", "in2", "s", "out"]));
        assert_eq!(rows[1][8], "ok");
    }

    #[test]
    fn formula_escaping_quotes_formula_cells_only_when_on() {
        let header = strings(&["t"]);
        let cases = ["=1+1", "+x", "-x", "@x", "\tx", "\rx", "a=b", "plain"];
        let lines: Vec<String> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| ok(i as u64 + 1, json!({ "t": c }), c))
            .collect();
        let (_, off) = export(&lines, Some(&header), false).unwrap();
        let (_, on) = export(&lines, Some(&header), true).unwrap();
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(off[i + 1][0], *c, "off: unchanged");
            assert_eq!(off[i + 1][1], *c, "off: unchanged");
            let want = if c.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                format!("'{c}")
            } else {
                c.to_string()
            };
            assert_eq!(on[i + 1][0], want, "input cell {c:?}");
            assert_eq!(on[i + 1][1], want, "completion cell {c:?}");
            assert_eq!(on[i + 1][2], "3", "numbers are never quoted");
        }
        let errored = [json!({
            "row": 1, "id": "1", "status": "error", "input": {"t": "ok"},
            "attempts": 1, "latency_ms": 1, "cost_usd": -0.5,
            "error": {"kind": "bad_request", "status": 400, "message": "=cmd"}
        })
        .to_string()];
        let (_, on) = export(&errored, Some(&header), true).unwrap();
        assert_eq!(
            on[1][5], "-0.50000000",
            "a number the export writes is never quoted"
        );
        assert_eq!(on[1][7], "'=cmd", "the error cell is quoted");
    }

    #[test]
    fn a_line_that_is_not_a_record_is_an_error_naming_its_line() {
        let lines = [
            ok(1, json!({"a": "1"}), "x"),
            String::new(),
            "{\"row\": 2, \"trunc".to_string(),
        ];
        for inputs in [None, Some(&strings(&["a"])[..])] {
            let e = export(&lines, inputs, false).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, Error::Input { .. }), "{text}");
            assert!(text.contains("out.jsonl: line 3: "), "{text}");
        }
    }

    #[test]
    fn columns_first_seen_late_and_variants_pad_the_lines_before_them() {
        let mut with_data = ok(2, json!({"a": "2", "b": "=b"}), "c2");
        with_data = with_data.replace(
            "\"error\":null",
            "\"error\":null,\"data\":{\"x\":1,\"y\":\"-y\"}",
        );
        let variants = json!({
            "row": 3, "id": "3", "status": "ok", "input": {"a": "3"}, "completion": "v1",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            "cost_usd": 0.5, "attempts": 1, "latency_ms": 7, "fingerprint": "f", "error": null,
            "data": {"x": 3}, "variants": [
                {"completion": "v1", "finish_reason": "stop", "data": {"x": 3}},
                {"completion": "=v2", "finish_reason": "stop", "data": {"y": "w"}}
            ]
        })
        .to_string();
        let lines = [ok(1, json!({"a": "1"}), "c1"), with_data, variants];
        let (n, rows) = export(&lines, None, true).unwrap();
        assert_eq!(n, 3, "records, not lines");
        let head = strings(&[
            "a",
            "b",
            "variant",
            "completion",
            "x",
            "y",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_usd",
            "status",
            "error",
        ]);
        assert_eq!(rows[0], head);
        let row = |v: &[&str]| strings(v);
        assert_eq!(
            rows[1],
            row(&[
                "1",
                "",
                "1",
                "c1",
                "",
                "",
                "3",
                "2",
                "5",
                "0.25000000",
                "ok",
                ""
            ])
        );
        assert_eq!(
            rows[2],
            row(&[
                "2",
                "'=b",
                "1",
                "c2",
                "1",
                "'-y",
                "3",
                "2",
                "5",
                "0.25000000",
                "ok",
                ""
            ])
        );
        assert_eq!(
            rows[3],
            row(&[
                "3",
                "",
                "1",
                "v1",
                "3",
                "",
                "3",
                "2",
                "5",
                "0.50000000",
                "ok",
                ""
            ])
        );
        assert_eq!(
            rows[4],
            row(&["3", "", "2", "'=v2", "", "w", "", "", "", "", "ok", ""]),
            "usage and cost on the first variant's line only"
        );
        assert_eq!(rows.len(), 5);
    }

    #[test]
    fn the_spool_is_gone_after_an_export_that_worked_or_failed() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("out.jsonl");
        let csv_path = dir.path().join("out.csv");
        for (text, works) in [
            (ok(1, json!({"a": "1"}), "x") + "\n", true),
            ("{\n".into(), false),
        ] {
            std::fs::write(&jsonl, text).unwrap();
            let r = export_csv(&jsonl, &csv_path, None, &CsvOptions::default());
            assert_eq!(r.is_ok(), works, "{r:?}");
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n != "out.jsonl" && n != "out.csv")
                .collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }

    #[test]
    fn a_failed_export_leaves_the_previous_csv_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("out.jsonl");
        let csv_path = dir.path().join("out.csv");
        std::fs::write(&csv_path, "good\n").unwrap();
        std::fs::write(&jsonl, ok(1, json!({"a": "1"}), "x") + "\nnot json\n").unwrap();
        let opts = CsvOptions {
            escape_formulas: false,
            data_columns: None,
        };
        let header = strings(&["a"]);
        for inputs in [None, Some(&header[..])] {
            assert!(export_csv(&jsonl, &csv_path, inputs, &opts).is_err());
            assert_eq!(std::fs::read_to_string(&csv_path).unwrap(), "good\n");
            assert!(!crate::ledger::files::sibling(&csv_path, ".tmp").exists());
        }
    }

    #[test]
    fn an_error_writing_the_csv_is_an_error_naming_the_csv() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("out.jsonl");
        std::fs::write(&jsonl, ok(1, json!({"a": "1"}), "x") + "\n").unwrap();
        // A folder where the CSV should be: the rename over it fails.
        let csv_path = dir.path().join("out.csv");
        std::fs::create_dir(&csv_path).unwrap();
        let opts = CsvOptions {
            escape_formulas: false,
            data_columns: None,
        };
        match export_csv(&jsonl, &csv_path, None, &opts) {
            Err(Error::Io { path, .. }) => assert_eq!(path, csv_path),
            other => panic!("expected an I/O error on the CSV, got {other:?}"),
        }
    }
}
