//! Parquet input: a file, a folder of part files or a glob of them, read row group by row
//! group (batches of 1,024 rows) with the `parquet` crate's Arrow reader, so memory stays flat
//! however large the dataset. Only the columns the job reads are decoded: those it names in
//! `[input] columns`, else every column its messages' text mentions, its id and its `from`
//! fields (a superset of what the templates read: a name that appears in the text is kept).
//!
//! Every Arrow type a dataset commonly holds becomes a template value: strings, numbers,
//! booleans, decimals (as text, exact), dates, times and timestamps (ISO 8601 text, UTC with
//! `Z` where the column has a time zone), binary (base64 text), lists, structs and maps (values
//! Tera loops over), dictionaries (their values). A null is a missing field. Any other type is
//! an error that names the column and its type.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Number, Value};

use crate::error::Error;

/// Rows a batch holds: small enough that a wide row group never sits in memory whole.
const BATCH_ROWS: usize = 1024;

/// Which columns to decode: named, or mentioned in this text.
#[derive(Debug, Clone)]
pub enum Wanted {
    Named(Vec<String>),
    /// The job's message texts and templates: a column whose name appears in them is read,
    /// as are these (the id, `from` fields).
    Mentioned {
        text: String,
        also: Vec<String>,
    },
}

impl Wanted {
    fn wants(&self, column: &str) -> bool {
        match self {
            Wanted::Named(names) => names.iter().any(|n| n == column),
            Wanted::Mentioned { text, also } => {
                text.contains(column) || also.iter().any(|n| n == column)
            }
        }
    }
}

/// The job's columns: `[input] columns`, else those its messages mention (inline text, image
/// templates, every template file in its template folders), its id and its `from` fields.
pub fn wanted(job: &crate::job::Job) -> Wanted {
    use crate::job::MessageSource;
    if let Some(c) = &job.input_columns {
        return Wanted::Named(c.clone());
    }
    let mut text = String::new();
    let mut also: Vec<String> = job.id_column.iter().cloned().collect();
    for m in &job.messages {
        match &m.source {
            MessageSource::Inline(t) => text.push_str(t),
            MessageSource::Field(f) => also.push(f.clone()),
            MessageSource::Template(_) => {} // read below, with what it includes
        }
        for img in &m.images {
            text.push_str(img);
        }
        text.push('\n');
    }
    for dir in &job.template_dirs {
        template_text(dir, &mut text, 0);
    }
    Wanted::Mentioned { text, also }
}

/// Every file's text under a template folder (includes, macros and parents are among them).
fn template_text(dir: &Path, out: &mut String, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && depth < 8 {
            template_text(&p, out, depth + 1);
        } else if p.metadata().is_ok_and(|m| m.len() < 4 << 20) {
            if let Ok(t) = std::fs::read_to_string(&p) {
                out.push_str(&t);
                out.push('\n');
            }
        }
    }
}

/// The part files of a dataset path: itself, a folder's `*.parquet` files, or a glob's
/// matches, in name order (a Spark export's part order).
pub fn files(path: &Path) -> Result<Vec<PathBuf>, Error> {
    let text = path.to_string_lossy();
    let mut found: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
            })
            .collect()
    } else if text.contains(['*', '?', '[']) {
        glob::glob(&text)
            .map_err(|e| Error::Input {
                path: path.to_path_buf(),
                message: format!("not a valid glob pattern: {e}"),
            })?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    found.sort();
    if found.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            message: "no Parquet files there".into(),
        });
    }
    Ok(found)
}

/// The Arrow fields of the columns a job reads from this dataset (its first part's schema).
pub fn fields(
    path: &Path,
    wanted: &Wanted,
) -> Result<Vec<std::sync::Arc<arrow_schema::Field>>, Error> {
    let first = files(path)?.remove(0);
    let f = File::open(&first).map_err(|e| Error::Io {
        path: first.clone(),
        source: e,
    })?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| Error::Input {
        path: first.clone(),
        message: format!("not a readable Parquet file: {e}"),
    })?;
    Ok(b.schema()
        .fields()
        .iter()
        .filter(|f| wanted.wants(f.name()))
        .cloned()
        .collect())
}

/// The rows of every part file in turn, as field maps.
pub struct ParquetRows {
    files: Vec<PathBuf>,
    next_file: usize,
    wanted: Wanted,
    /// The columns read, from the first file: every later part must hold them.
    columns: Vec<String>,
    reader: Option<ParquetRecordBatchReader>,
    batch: Option<RecordBatch>,
    at: usize,
    /// The file being read and its row number within it (for messages).
    file: PathBuf,
    file_row: u64,
}

impl ParquetRows {
    /// Opens the first part file: a missing file, one that is not Parquet, or a named column
    /// it lacks is an error here, before any request goes out.
    pub fn open(path: &Path, wanted: Wanted) -> Result<ParquetRows, Error> {
        let files = files(path)?;
        let mut rows = ParquetRows {
            files,
            next_file: 0,
            wanted,
            columns: Vec::new(),
            reader: None,
            batch: None,
            at: 0,
            file: PathBuf::new(),
            file_row: 0,
        };
        rows.open_next()?;
        Ok(rows)
    }

    /// The columns read (the header a `validate` shows).
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    fn open_next(&mut self) -> Result<bool, Error> {
        let Some(path) = self.files.get(self.next_file).cloned() else {
            self.reader = None;
            return Ok(false);
        };
        self.next_file += 1;
        let bad = |message: String| Error::Input {
            path: path.clone(),
            message,
        };
        let f = File::open(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        let schema = builder.schema().clone();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        if let Wanted::Named(want) = &self.wanted {
            if let Some(missing) = want.iter().find(|w| !names.contains(w)) {
                return Err(bad(format!(
                    "the column `{missing}` ([input] columns) is not in the file ({})",
                    names.join(", ")
                )));
            }
        }
        let keep: Vec<usize> = (0..names.len())
            .filter(|&i| self.wanted.wants(&names[i]))
            .collect();
        let cols: Vec<String> = keep.iter().map(|&i| names[i].clone()).collect();
        if self.next_file == 1 {
            self.columns = cols;
        } else if let Some(m) = self.columns.iter().find(|c| !cols.contains(c)) {
            return Err(bad(format!(
                "this part has no column `{m}`, which the first part ({}) has",
                self.files[0].display()
            )));
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), keep);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        self.reader = Some(reader);
        self.batch = None;
        self.file = path;
        self.file_row = 0;
        Ok(true)
    }

    /// The next row's fields; `Err(message, fatal)`. A value of a type promptmill cannot
    /// read fails its row; a file that cannot be read ends the stream.
    pub fn next_row(&mut self) -> Option<Result<Map<String, Value>, (String, bool)>> {
        loop {
            if let Some(b) = &self.batch {
                if self.at < b.num_rows() {
                    let i = self.at;
                    self.at += 1;
                    self.file_row += 1;
                    return Some(row(b, i).map_err(|m| {
                        (
                            format!(
                                "{}: row {} of the file: {m}",
                                self.file.display(),
                                self.file_row
                            ),
                            false,
                        )
                    }));
                }
            }
            let reader = self.reader.as_mut()?;
            match reader.next() {
                Some(Ok(b)) => {
                    self.batch = Some(b);
                    self.at = 0;
                }
                Some(Err(e)) => {
                    self.reader = None;
                    self.files.truncate(self.next_file);
                    return Some(Err((
                        format!(
                            "{}: cannot read past row {}: {e}",
                            self.file.display(),
                            self.file_row
                        ),
                        true,
                    )));
                }
                None => match self.open_next() {
                    Ok(true) => {}
                    Ok(false) => return None,
                    Err(e) => {
                        self.reader = None;
                        self.files.truncate(self.next_file);
                        return Some(Err((e.to_string(), true)));
                    }
                },
            }
        }
    }
}

/// Row `i` of a batch: its non-null columns.
fn row(b: &RecordBatch, i: usize) -> Result<Map<String, Value>, String> {
    let schema = b.schema();
    let mut fields = Map::with_capacity(b.num_columns());
    for (f, col) in schema.fields().iter().zip(b.columns()) {
        if col.is_null(i) {
            continue;
        }
        let v = value(col.as_ref(), i).map_err(|t| {
            format!(
                "column `{}` is of type {t}, which promptmill cannot read",
                f.name()
            )
        })?;
        fields.insert(f.name().clone(), v);
    }
    Ok(fields)
}

fn num<T: Into<Number>>(v: T) -> Value {
    Value::Number(v.into())
}

/// A float as a JSON number; NaN and the infinities, which JSON has no number for, as text.
fn float(v: f64) -> Value {
    Number::from_f64(v).map_or_else(|| Value::String(v.to_string()), Value::Number)
}

/// Element `i` of an array as a template value; `Err`: the type's name, unsupported.
fn value(a: &dyn Array, i: usize) -> Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => num(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => num(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => num(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => num(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => num(a.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => num(a.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => num(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => num(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float16 => float(f64::from(a.as_primitive::<Float16Type>().value(i).to_f32())),
        DataType::Float32 => float(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Binary => base64(a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => base64(a.as_binary::<i64>().value(i)),
        DataType::BinaryView => base64(a.as_binary_view().value(i)),
        DataType::FixedSizeBinary(_) => base64(a.as_fixed_size_binary().value(i)),
        DataType::Decimal128(..) => {
            Value::String(a.as_primitive::<Decimal128Type>().value_as_string(i))
        }
        DataType::Decimal256(..) => {
            Value::String(a.as_primitive::<Decimal256Type>().value_as_string(i))
        }
        DataType::Date32
        | DataType::Date64
        | DataType::Timestamp(..)
        | DataType::Time32(_)
        | DataType::Time64(_) => temporal(a, i),
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::Struct(_)
        | DataType::Map(..)
        | DataType::Dictionary(..) => nested(a, i)?,
        other => return Err(other.to_string()),
    })
}

/// A date, time of day or timestamp as ISO 8601 text.
fn temporal(a: &dyn Array, i: usize) -> Value {
    match a.data_type() {
        DataType::Date32 => {
            date(i128::from(a.as_primitive::<Date32Type>().value(i)) * 86_400_000_000_000)
        }
        DataType::Date64 => date(i128::from(a.as_primitive::<Date64Type>().value(i)) * 1_000_000),
        DataType::Timestamp(unit, tz) => {
            let v = match unit {
                TimeUnit::Second => a.as_primitive::<TimestampSecondType>().value(i),
                TimeUnit::Millisecond => a.as_primitive::<TimestampMillisecondType>().value(i),
                TimeUnit::Microsecond => a.as_primitive::<TimestampMicrosecondType>().value(i),
                TimeUnit::Nanosecond => a.as_primitive::<TimestampNanosecondType>().value(i),
            };
            timestamp(i128::from(v) * nanos_per(unit), tz.is_some())
        }
        DataType::Time32(unit) => {
            let v = match unit {
                TimeUnit::Second => a.as_primitive::<Time32SecondType>().value(i),
                _ => a.as_primitive::<Time32MillisecondType>().value(i),
            };
            time_of_day(i128::from(v) * nanos_per(unit))
        }
        DataType::Time64(unit) => {
            let v = match unit {
                TimeUnit::Microsecond => a.as_primitive::<Time64MicrosecondType>().value(i),
                _ => a.as_primitive::<Time64NanosecondType>().value(i),
            };
            time_of_day(i128::from(v) * nanos_per(unit))
        }
        _ => Value::Null,
    }
}

/// A list, struct, map or dictionary's element as a template value.
fn nested(a: &dyn Array, i: usize) -> Result<Value, String> {
    Ok(match a.data_type() {
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(..) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut m = Map::with_capacity(fields.len());
            for (f, col) in fields.iter().zip(s.columns()) {
                if !col.is_null(i) {
                    m.insert(f.name().clone(), value(col.as_ref(), i)?);
                }
            }
            Value::Object(m)
        }
        DataType::Map(..) => {
            let entries = a.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut m = Map::with_capacity(entries.len());
            for j in 0..entries.len() {
                let k = match value(keys.as_ref(), j)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                m.insert(k, value(values.as_ref(), j)?);
            }
            Value::Object(m)
        }
        DataType::Dictionary(..) => {
            let d = a.as_any_dictionary();
            let k = d.normalized_keys()[i];
            value(d.values().as_ref(), k)?
        }
        other => return Err(other.to_string()),
    })
}

fn list(items: &dyn Array) -> Result<Value, String> {
    (0..items.len())
        .map(|j| value(items, j))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn base64(bytes: &[u8]) -> Value {
    use base64::Engine;
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn nanos_per(unit: &TimeUnit) -> i128 {
    match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    }
}

/// A date: `2026-01-31`.
fn date(nanos: i128) -> Value {
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => Value::String(t.date().to_string()),
        Err(_) => Value::String(format!("(a date out of range: {nanos} ns)")),
    }
}

/// A timestamp: `2026-01-31T09:05:00Z` (`Z` when the column has a time zone: the instant,
/// in UTC), with as many fraction digits as it has.
fn timestamp(nanos: i128, zoned: bool) -> Value {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(nanos) else {
        return Value::String(format!("(a time out of range: {nanos} ns)"));
    };
    let z = if zoned { "Z" } else { "" };
    Value::String(format!("{}T{}{z}", t.date(), clock(t.time())))
}

fn time_of_day(nanos: i128) -> Value {
    let day = 86_400_000_000_000i128;
    let t = time::Time::MIDNIGHT + time::Duration::nanoseconds((nanos.rem_euclid(day)) as i64);
    Value::String(clock(t))
}

/// `09:05:00`, `09:05:00.25`: seconds' fraction only when there is one.
fn clock(t: time::Time) -> String {
    let base = format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    match t.nanosecond() {
        0 => base,
        n => {
            let frac = format!("{n:09}");
            format!("{base}.{}", frac.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{MapBuilder, StringBuilder};
    use arrow_array::{
        ArrayRef, Float64Array, IntervalDayTimeArray, LargeListArray, Time64MicrosecondArray,
        TimestampSecondArray,
    };

    use super::*;

    #[test]
    fn times_floats_maps_and_large_lists_read_as_their_text_and_values() {
        let t = Time64MicrosecondArray::from(vec![9 * 3_600_000_000 + 5 * 60_000_000 + 250_000]);
        assert_eq!(value(&t, 0).unwrap(), "09:05:00.25");
        let naive = TimestampSecondArray::from(vec![1_767_225_600]);
        assert_eq!(
            value(&naive, 0).unwrap(),
            "2026-01-01T00:00:00",
            "no zone, no Z"
        );
        let f = Float64Array::from(vec![f64::NAN, 1.5]);
        assert_eq!(value(&f, 0).unwrap(), "NaN");
        assert_eq!(value(&f, 1).unwrap(), 1.5);
        let mut m = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
        m.keys().append_value("colour");
        m.values().append_value("red");
        m.append(true).unwrap();
        let m = m.finish();
        assert_eq!(value(&m, 0).unwrap(), serde_json::json!({"colour": "red"}));
        let l =
            LargeListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1), None])]);
        assert_eq!(value(&l, 0).unwrap(), serde_json::json!([1, null]));
        let i: ArrayRef = Arc::new(IntervalDayTimeArray::from(vec![
            arrow_array::types::IntervalDayTime::new(1, 0),
        ]));
        assert!(value(i.as_ref(), 0).unwrap_err().contains("Interval"));
    }
}

#[cfg(test)]
mod file_tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;

    use super::*;

    fn write(path: &Path, cols: Vec<(&str, ArrayRef)>) {
        let b = RecordBatch::try_from_iter(cols).unwrap();
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), b.schema(), None).unwrap();
        w.write(&b).unwrap();
        w.close().unwrap();
    }

    fn all() -> Wanted {
        Wanted::Named(vec!["t".into(), "bin".into()])
    }

    #[test]
    fn binary_is_base64_and_a_bad_file_or_a_part_short_of_a_column_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let t = |v: &str| Arc::new(StringArray::from(vec![v])) as ArrayRef;
        let bin = Arc::new(BinaryArray::from(vec![b"\x00\x01".as_ref()])) as ArrayRef;
        write(
            &d.path().join("part-0.parquet"),
            vec![("t", t("a")), ("bin", bin)],
        );
        write(&d.path().join("part-1.parquet"), vec![("t", t("b"))]);
        let mut rows = ParquetRows::open(d.path(), all()).unwrap();
        let first = rows.next_row().unwrap().unwrap();
        assert_eq!(first["bin"], "AAE=");
        // The second part lacks `bin`: the stream ends there, saying why.
        let (msg, fatal) = rows.next_row().unwrap().unwrap_err();
        assert!(
            fatal && msg.contains("`bin`") && msg.contains("part-1.parquet"),
            "{msg}"
        );
        assert!(rows.next_row().is_none());

        let not = d.path().join("not.parquet");
        std::fs::write(&not, "id,text\n1,a\n").unwrap();
        let e = ParquetRows::open(&not, all()).err().unwrap().to_string();
        assert!(e.contains("not a readable Parquet file"), "{e}");
    }
}
