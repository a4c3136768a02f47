//! Input rows: CSV (with a header), JSONL or Parquet (`parquet.rs`), streamed from a file or
//! stdin on a blocking thread. A bad record becomes a `RowError` naming the file, line and
//! field; the stream goes on.

pub mod chunks;
pub mod parquet;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::Error;
pub use crate::job::InputFormat;

/// One input row: its 1-based number among the data rows, its id, and its fields.
#[derive(Debug, Clone)]
pub struct Row {
    pub number: u64,
    pub id: String,
    pub fields: Map<String, Value>,
}

/// A row that could not be read. It still has a number, so it gets a record of its own.
#[derive(Debug, Clone)]
pub struct RowError {
    pub number: u64,
    pub message: String,
    /// The input could not be read past this point (an I/O error): the rows after it are
    /// unknown, not gone.
    pub fatal: bool,
}

pub type RowResult = Result<Row, RowError>;

pub struct Source {
    pub path: PathBuf,
    pub format: InputFormat,
    pub id_column: Option<String>,
    /// Parquet: the columns to decode.
    pub wanted: Option<parquet::Wanted>,
}

impl Source {
    /// The job's input, ready to stream.
    pub fn of(job: &crate::job::Job) -> Source {
        Source {
            path: job.input.clone(),
            format: job.input_format,
            id_column: job.id_column.clone(),
            wanted: (job.input_format == InputFormat::Parquet).then(|| parquet::wanted(job)),
        }
    }

    fn open(&self) -> Result<Box<dyn Read + Send>, Error> {
        if self.path.as_os_str() == "-" {
            return Ok(Box::new(std::io::stdin()));
        }
        let f = std::fs::File::open(&self.path).map_err(|e| Error::Io {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(Box::new(f))
    }

    /// The column names, read from the CSV header or the first JSONL object (for `validate`).
    pub fn columns(&self) -> Result<Vec<String>, Error> {
        let mut rows = self.reader()?;
        match self.format {
            InputFormat::Csv | InputFormat::Parquet => Ok(rows.header.clone()),
            InputFormat::Jsonl => {
                let first = rows.by_ref().flatten().next();
                Ok(first
                    .map(|row| row.fields.keys().cloned().collect())
                    .unwrap_or_default())
            }
        }
    }

    /// A blocking iterator over the rows. Opening errors (missing file, bad header) are
    /// returned here, before any request goes out.
    pub fn reader(&self) -> Result<Rows, Error> {
        let display = self.path.display().to_string();
        if self.format == InputFormat::Parquet {
            return self.parquet(display);
        }
        let inner = self.open()?;
        match self.format {
            InputFormat::Csv => {
                let mut rdr = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(true)
                    .from_reader(inner);
                let header = rdr.byte_headers().map_err(|e| Error::Input {
                    path: self.path.clone(),
                    message: format!("cannot read the CSV header: {e}"),
                })?;
                let mut names = Vec::with_capacity(header.len());
                for (i, h) in header.iter().enumerate() {
                    let name = std::str::from_utf8(h).map_err(|_| Error::Input {
                        path: self.path.clone(),
                        message: format!("line 1: header column {} is not valid UTF-8", i + 1),
                    })?;
                    // A UTF-8 byte-order mark would otherwise stick to the first column's name.
                    names.push(name.trim_start_matches('\u{feff}').to_string());
                }
                if let Some(id) = &self.id_column {
                    if !names.contains(id) {
                        return Err(Error::Input {
                            path: self.path.clone(),
                            message: format!(
                                "the id column `{id}` is not in the header ({})",
                                names.join(", ")
                            ),
                        });
                    }
                }
                Ok(Rows {
                    display,
                    id_column: self.id_column.clone(),
                    header: names,
                    kind: Kind::Csv(rdr, csv::ByteRecord::new()),
                    number: 0,
                })
            }
            InputFormat::Jsonl | InputFormat::Parquet => Ok(Rows {
                display,
                id_column: self.id_column.clone(),
                header: Vec::new(),
                kind: Kind::Jsonl {
                    reader: BufReader::with_capacity(64 * 1024, inner),
                    line: 0,
                    buf: Vec::new(),
                },
                number: 0,
            }),
        }
    }

    /// A Parquet dataset's rows; its header is the columns read. (A piped Parquet file was
    /// copied to disk first: it needs seeking.)
    fn parquet(&self, display: String) -> Result<Rows, Error> {
        if self.path.as_os_str() == "-" {
            return Err(Error::Input {
                path: self.path.clone(),
                message: "Parquet cannot be read from stdin as it streams: name the file".into(),
            });
        }
        let wanted = self.wanted.clone().unwrap_or(parquet::Wanted::Mentioned {
            text: String::new(),
            also: Vec::new(),
        });
        let rows = parquet::ParquetRows::open(&self.path, wanted)?;
        if let Some(id) = &self.id_column {
            if !rows.columns().contains(id) {
                return Err(Error::Input {
                    path: self.path.clone(),
                    message: format!(
                        "the id column `{id}` is not among the columns read ({})",
                        rows.columns().join(", ")
                    ),
                });
            }
        }
        Ok(Rows {
            display,
            id_column: self.id_column.clone(),
            header: rows.columns().to_vec(),
            kind: Kind::Parquet(Box::new(rows)),
            number: 0,
        })
    }

    /// Streams rows into a bounded channel from a blocking thread, so reading never holds
    /// more than the channel's capacity in memory. The input is opened once: the CSV header
    /// (empty for JSONL) comes back with the stream, so a pipe or FIFO is read whole by one
    /// reader.
    pub fn stream(&self, capacity: usize) -> Result<(Vec<String>, RowStream), Error> {
        let rows = self.reader()?;
        let header = rows.header.clone();
        let (mut tx, rx) = chunks::channel(capacity);
        std::thread::Builder::new()
            .name("input".into())
            .spawn(move || {
                for r in rows {
                    if tx.push(r, true).is_err() {
                        return; // the scheduler stopped reading
                    }
                }
                tx.end();
            })
            .map_err(|e| Error::Other(format!("cannot start the input reader: {e}")))?;
        Ok((header, rx))
    }
}

/// The rows read on the input thread, in order.
pub type RowStream = chunks::Receiver<RowResult>;

enum Kind {
    Csv(csv::Reader<Box<dyn Read + Send>>, csv::ByteRecord),
    Parquet(Box<parquet::ParquetRows>),
    Jsonl {
        reader: BufReader<Box<dyn Read + Send>>,
        line: u64,
        buf: Vec<u8>,
    },
}

pub struct Rows {
    display: String,
    id_column: Option<String>,
    header: Vec<String>,
    kind: Kind,
    number: u64,
}

impl Rows {
    fn id_for(&self, number: u64, fields: &Map<String, Value>, at: &str) -> Result<String, String> {
        let Some(col) = &self.id_column else {
            return Ok(number.to_string());
        };
        match fields.get(col) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(Value::String(_)) | Some(Value::Null) | None => Err(format!(
                "{}: {at}: field `{col}` (the id column) is missing or empty",
                self.display
            )),
            Some(_) => Err(format!(
                "{}: {at}: field `{col}` (the id column) must be a string or a number",
                self.display
            )),
        }
    }
}

impl Iterator for Rows {
    type Item = RowResult;

    fn next(&mut self) -> Option<RowResult> {
        match self.kind {
            Kind::Csv(..) => self.next_csv(),
            Kind::Jsonl { .. } => self.next_jsonl(),
            Kind::Parquet(..) => self.next_parquet(),
        }
    }
}

impl Rows {
    /// After an I/O error: the rows after it are unknown, so the stream ends.
    fn end(&mut self) {
        self.kind = Kind::Jsonl {
            reader: BufReader::new(Box::new(std::io::empty())),
            line: 0,
            buf: Vec::new(),
        };
    }

    fn row_or_error(
        &self,
        number: u64,
        fields: Result<Map<String, Value>, String>,
        at: &str,
    ) -> RowResult {
        let bad = |message| RowError {
            number,
            message,
            fatal: false,
        };
        let fields = fields.map_err(bad)?;
        let id = self.id_for(number, &fields, at).map_err(bad)?;
        Ok(Row { number, id, fields })
    }

    fn next_csv(&mut self) -> Option<RowResult> {
        let Kind::Csv(rdr, rec) = &mut self.kind else {
            unreachable!("a CSV reader")
        };
        let res = rdr.read_byte_record(rec);
        self.number += 1;
        let number = self.number;
        match res {
            Ok(false) => None,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                // An I/O error ends the stream; a malformed record fails that row only.
                let fatal = matches!(e.kind(), csv::ErrorKind::Io(_));
                let message = format!("{}: line {line}: malformed CSV record: {e}", self.display);
                if fatal {
                    self.end();
                }
                Some(Err(RowError {
                    number,
                    message,
                    fatal,
                }))
            }
            Ok(true) => {
                let line = rec.position().map(|p| p.line()).unwrap_or(0);
                let at = format!("line {line} (row {number})");
                let fields = csv_fields(&self.header, rec, &self.display, &at);
                Some(self.row_or_error(number, fields, &at))
            }
        }
    }

    fn next_parquet(&mut self) -> Option<RowResult> {
        let Kind::Parquet(rows) = &mut self.kind else {
            unreachable!("a Parquet reader")
        };
        let fields = rows.next_row()?;
        self.number += 1;
        let number = self.number;
        match fields {
            Ok(fields) => {
                let at = format!("row {number}");
                Some(self.row_or_error(number, Ok(fields), &at))
            }
            Err((message, fatal)) => Some(Err(RowError {
                number,
                message,
                fatal,
            })),
        }
    }

    fn next_jsonl(&mut self) -> Option<RowResult> {
        let Kind::Jsonl { reader, line, buf } = &mut self.kind else {
            unreachable!("a JSONL reader")
        };
        loop {
            buf.clear();
            if let Err(e) = reader.read_until(b'\n', buf) {
                self.number += 1;
                let message = format!("{}: line {}: read error: {e}", self.display, *line + 1);
                self.end();
                return Some(Err(RowError {
                    number: self.number,
                    message,
                    fatal: true,
                }));
            }
            if buf.is_empty() {
                return None;
            }
            *line += 1;
            let mut text = buf.trim_ascii();
            if *line == 1 {
                // A UTF-8 byte-order mark, as some editors and exporters write: not the row's.
                text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
            }
            if text.is_empty() {
                continue; // blank lines are not rows
            }
            self.number += 1;
            let number = self.number;
            let at = format!("line {} (row {number})", *line);
            let fields = jsonl_fields(text, &self.display, &at);
            return Some(self.row_or_error(number, fields, &at));
        }
    }
}

/// A CSV record's fields by the header's names; every field must be UTF-8.
fn csv_fields(
    header: &[String],
    rec: &csv::ByteRecord,
    display: &str,
    at: &str,
) -> Result<Map<String, Value>, String> {
    if rec.len() != header.len() {
        return Err(format!(
            "{display}: {at}: malformed CSV record: {} fields, the header has {}",
            rec.len(),
            header.len()
        ));
    }
    let mut fields = Map::with_capacity(header.len());
    for (name, raw) in header.iter().zip(rec.iter()) {
        let s = std::str::from_utf8(raw)
            .map_err(|_| format!("{display}: {at}: field `{name}` is not valid UTF-8"))?;
        fields.insert(name.clone(), Value::String(s.to_string()));
    }
    Ok(fields)
}

/// A JSONL line's object.
fn jsonl_fields(text: &[u8], display: &str, at: &str) -> Result<Map<String, Value>, String> {
    let s = std::str::from_utf8(text).map_err(|e| match bad_utf8_field(text) {
        Some(field) => format!("{display}: {at}: field `{field}` is not valid UTF-8"),
        None => format!(
            "{display}: {at}: not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ),
    })?;
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "{display}: {at}: expected a JSON object, found {}",
            json_kind(&other)
        )),
        Err(e) => Err(format!("{display}: {at}: invalid JSON: {e}")),
    }
}

/// Which top-level field of a JSONL line holds the invalid bytes: parse a lossy copy and look
/// for the replacement character.
fn bad_utf8_field(line: &[u8]) -> Option<String> {
    let lossy = String::from_utf8_lossy(line);
    let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&lossy) else {
        return None;
    };
    let has = |v: &Value| v.to_string().contains('\u{fffd}');
    m.iter()
        .find(|(k, v)| k.contains('\u{fffd}') || has(v))
        .map(|(k, _)| k.clone())
}

/// What a JSON value is, for an error message ("a string", "an object", …).
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// For messages that name the input: `-` reads as stdin.
pub fn describe(path: &Path) -> String {
    if path.as_os_str() == "-" {
        "stdin".into()
    } else {
        path.display().to_string()
    }
}
