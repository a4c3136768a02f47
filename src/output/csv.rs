//! The CSV export: one line per record of the compacted JSONL output, in its order, under a
//! header that names every input column and never the same column twice.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::Usage;
use crate::error::Error;
use crate::ledger::record::{Record, Status};

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
    let union;
    let inputs = match input_columns {
        Some(cols) => cols,
        None => {
            union = input_union(jsonl)?;
            &union[..]
        }
    };
    let (data_union, variants) = shape_of(jsonl)?;
    let data = opts.data_columns.clone().unwrap_or(data_union);
    let mut names: Vec<&str> = Vec::new();
    if variants {
        names.push("variant");
    }
    names.push("completion");
    names.extend(data.iter().map(String::as_str));
    names.extend(OUTPUT_COLUMNS);
    let mut header = inputs.to_vec();
    header.extend(output_columns(inputs, &names));
    let layout = Layout {
        inputs,
        data: &data,
        variants,
    };
    if let Some(dir) = csv_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    // Written beside and renamed over, so a failure never leaves half a CSV in place of a good one.
    let tmp = crate::ledger::files::sibling(csv_path, ".tmp");
    match write_csv(jsonl, &tmp, csv_path, &header, &layout, opts) {
        Ok(n) => {
            crate::ledger::files::rename_durably(&tmp, csv_path)?;
            Ok(n)
        }
        Err(e) => {
            // The error that matters is `e`; a temp file we cannot remove is only litter.
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Which columns a line has.
struct Layout<'a> {
    inputs: &'a [String],
    data: &'a [String],
    /// One line per variant, with a `variant` column.
    variants: bool,
}

fn write_csv(
    jsonl: &Path,
    tmp: &Path,
    csv_path: &Path,
    header: &[String],
    layout: &Layout,
    opts: &CsvOptions,
) -> Result<u64, Error> {
    let io = |e: std::io::Error| Error::Io {
        path: csv_path.to_path_buf(),
        source: e,
    };
    let mut w = csv::Writer::from_writer(File::create(tmp).map_err(io)?);
    w.write_record(header).map_err(|e| io(e.into()))?;
    let mut n = 0;
    for r in Records::open(jsonl)? {
        let r = r?;
        match (&r.variants, layout.variants) {
            (Some(vs), true) if !vs.is_empty() => {
                for (i, v) in vs.iter().enumerate() {
                    w.write_record(cells(&r, Some((i, v)), layout, opts))
                        .map_err(|e| io(e.into()))?;
                }
            }
            _ => w
                .write_record(cells(&r, None, layout, opts))
                .map_err(|e| io(e.into()))?,
        }
        n += 1;
    }
    w.flush().map_err(io)?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    // Durable before the rename, as the compacted JSONL is.
    file.sync_all().map_err(io)?;
    Ok(n)
}

/// A record's CSV line (or one variant's): its input cells in `inputs` order, then the output
/// columns. Usage and cost are the request's: on the first variant's line only, so the
/// column sums to what was paid.
fn cells(
    r: &Record,
    variant: Option<(usize, &crate::ledger::record::Variant)>,
    layout: &Layout,
    opts: &CsvOptions,
) -> Vec<String> {
    let inputs = layout.inputs;
    let text = |s: String| {
        if opts.escape_formulas {
            escape_formula(s)
        } else {
            s
        }
    };
    let mut cells: Vec<String> = inputs
        .iter()
        .map(|c| {
            text(match r.input.get(c) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            })
        })
        .collect();
    let first = variant.is_none_or(|(i, _)| i == 0);
    let tokens = |count: fn(&Usage) -> u64| {
        r.usage
            .as_ref()
            .filter(|_| first)
            .map(|u| count(u).to_string())
            .unwrap_or_default()
    };
    if layout.variants {
        cells.push(variant.map_or_else(|| "1".into(), |(i, _)| (i + 1).to_string()));
    }
    let (completion, data) = match variant {
        Some((_, v)) => (Some(v.completion.clone()), v.data.as_ref()),
        None => (r.completion.clone(), r.data.as_ref()),
    };
    cells.push(text(completion.unwrap_or_default()));
    for col in layout.data {
        cells.push(text(match data.and_then(|d| d.get(col)) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(v) => v.to_string(),
        }));
    }
    cells.push(tokens(|u| u.prompt_tokens));
    cells.push(tokens(|u| u.completion_tokens));
    cells.push(tokens(|u| u.total_tokens));
    cells.push(
        r.cost_usd
            .filter(|_| first)
            .map(|c| format!("{c:.8}"))
            .unwrap_or_default(),
    );
    cells.push(
        match r.status {
            Status::Ok => "ok",
            Status::Error => "error",
        }
        .into(),
    );
    cells.push(text(
        r.error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
    ));
    cells
}

/// A cell a spreadsheet would evaluate (`=`, `+`, `-`, `@`, tab, CR first) is made text by a
/// leading `'`.
fn escape_formula(s: String) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s
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

/// The keys of the records' `data` in first-seen order, and whether any record has variants.
fn shape_of(jsonl: &Path) -> Result<(Vec<String>, bool), Error> {
    let mut seen = HashSet::new();
    let mut columns = Vec::new();
    let mut variants = false;
    for r in Records::open(jsonl)? {
        let r = r?;
        variants |= r.variants.as_ref().is_some_and(|v| !v.is_empty());
        if let Some(Value::Object(d)) = &r.data {
            for key in d.keys() {
                if seen.insert(key.clone()) {
                    columns.push(key.clone());
                }
            }
        }
    }
    Ok((columns, variants))
}

/// Every input key of every record, in first-seen order: one streaming pass, so a record
/// without input (an unreadable row) cannot hide a column, and memory grows with the columns,
/// not the rows.
fn input_union(jsonl: &Path) -> Result<Vec<String>, Error> {
    let mut seen = HashSet::new();
    let mut columns = Vec::new();
    for r in Records::open(jsonl)? {
        for key in r?.input.keys() {
            if !seen.contains(key) {
                seen.insert(key.clone());
                columns.push(key.clone());
            }
        }
    }
    Ok(columns)
}

/// The records of a JSONL output, streamed; a line that is not a record is an error naming
/// the file and its 1-based line.
struct Records {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    buf: Vec<u8>,
}

impl Records {
    fn open(path: &Path) -> Result<Records, Error> {
        let f = File::open(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Records {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(64 * 1024, f),
            line: 0,
            buf: Vec::new(),
        })
    }
}

impl Iterator for Records {
    type Item = Result<Record, Error>;

    fn next(&mut self) -> Option<Result<Record, Error>> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    return Some(Err(Error::Io {
                        path: self.path.clone(),
                        source: e,
                    }))
                }
            }
            self.line += 1;
            let text = self.buf.trim_ascii();
            if text.is_empty() {
                continue;
            }
            return Some(serde_json::from_slice(text).map_err(|e| Error::Input {
                path: self.path.clone(),
                message: format!("line {}: not an output record: {e}", self.line),
            }));
        }
    }
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
