//! The Parquet output (`[output] parquet`): the compacted records as a typed table, streamed
//! in row groups of 65,536 rows (8,192 decoded at a time), so memory stays flat however many
//! records there are. Written when the run finishes, from the output in input order, and by
//! `merge --parquet`; whole or not at all (the atomic replace).
//!
//! Columns, in order: `row` and `id`; the input's columns with their own types (a Parquet
//! input's Arrow types; a JSONL input's, inferred from its values; text for CSV); the schema's
//! fields as typed columns (an object as a struct, an array as a list); `completion`,
//! `variants` (a list of `{completion, data}` as JSON text, when the job asks for several),
//! the usage's token counts, `cost_usd`, `status`, and `error` with `error_kind`. A name
//! taken by an earlier column gets its group's prefix (`input.`, `data.`).

use std::path::Path;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use crate::error::Error;
use crate::ledger::files::Pending;
use crate::ledger::journal::{for_each_line, parse_line};

const DECODE_ROWS: usize = 8192;
const ROW_GROUP_ROWS: usize = 65_536;
/// A row group is also closed once it holds this much encoded data: the writer keeps a whole
/// row group in memory, and 65,536 long completions would be tens of megabytes.
const ROW_GROUP_BYTES: usize = 16 << 20;

/// The input columns' types, as the job's input knows them.
#[derive(Debug, Clone)]
pub enum InputTypes {
    /// A Parquet input's fields (the columns read).
    Arrow(Vec<Arc<Field>>),
    /// A CSV input's header: text.
    Text(Vec<String>),
    /// A JSONL input: from the records' values.
    Infer,
}

/// What the table's columns are.
#[derive(Debug, Clone)]
pub struct ParquetOptions {
    pub input: InputTypes,
    /// The job's JSON Schema, whose top-level properties become typed columns; `None`: the
    /// records' `data` keys, typed by their values (`merge`, which has no job file).
    pub data_schema: Option<Value>,
}

/// One column of the table: where its value comes from in a record.
#[derive(Debug, Clone)]
enum Source {
    Row,
    Id,
    Input(String),
    Data(String),
    Completion,
    Variants,
    Usage(&'static str),
    Cost,
    Status,
    Error,
    ErrorKind,
}

/// The job's input columns and their types: a Parquet input's fields (of the columns it
/// reads), a CSV input's header as text, a JSONL input's inferred from the records.
pub fn input_types(
    job: &crate::job::Job,
    csv_header: Option<&[String]>,
) -> Result<InputTypes, Error> {
    use crate::input::InputFormat;
    Ok(match job.input_format {
        InputFormat::Csv => {
            InputTypes::Text(csv_header.map(<[String]>::to_vec).unwrap_or_default())
        }
        InputFormat::Jsonl => InputTypes::Infer,
        InputFormat::Parquet => {
            let wanted = crate::input::parquet::wanted(job);
            InputTypes::Arrow(crate::input::parquet::fields(&job.input, &wanted)?)
        }
    })
}

/// Writes `jsonl`'s records to `out` as Parquet; the number of rows written.
pub fn export_parquet(jsonl: &Path, out: &Path, opts: &ParquetOptions) -> Result<u64, Error> {
    std::fs::metadata(jsonl).map_err(|e| crate::ledger::journal::io_err(jsonl, e))?;
    let input = match &opts.input {
        InputTypes::Arrow(f) => f.iter().map(|f| plain(f)).collect(),
        InputTypes::Text(names) => names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect(),
        InputTypes::Infer => infer(jsonl, "input")?,
    };
    let data = match &opts.data_schema {
        Some(s) => schema_fields(s),
        None => infer(jsonl, "data")?,
    };
    let (schema, sources) = layout(input, data);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| crate::ledger::journal::io_err(dir, e))?;
    }
    let mut pending = Pending::create(out)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let arrow = |e: String| Error::Input {
        path: out.to_path_buf(),
        message: format!("cannot write Parquet: {e}"),
    };
    let mut writer = ArrowWriter::try_new(pending.writer(), schema.clone(), Some(props))
        .map_err(|e| arrow(e.to_string()))?;
    let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(DECODE_ROWS)
        .with_coerce_primitive(true)
        .build_decoder()
        .map_err(|e| arrow(e.to_string()))?;
    let mut rows: Vec<Value> = Vec::with_capacity(DECODE_ROWS);
    let mut written = 0u64;
    type Writer<'a> = ArrowWriter<&'a mut std::io::BufWriter<std::fs::File>>;
    let mut flush = |rows: &mut Vec<Value>, w: &mut Writer| -> Result<(), Error> {
        decoder.serialize(rows).map_err(|e| arrow(e.to_string()))?;
        if let Some(b) = decoder.flush().map_err(|e| arrow(e.to_string()))? {
            w.write(&b).map_err(|e| arrow(e.to_string()))?;
            if w.memory_size() > ROW_GROUP_BYTES {
                w.flush().map_err(|e| arrow(e.to_string()))?;
            }
        }
        rows.clear();
        Ok(())
    };
    for_each_line(jsonl, |_, n, bytes| {
        let bad = |e: String| Error::Input {
            path: jsonl.to_path_buf(),
            message: format!("line {n}: not an output record: {e}"),
        };
        // One parse a record: the table reads everything from the value.
        let text = bytes.trim_ascii();
        if text.is_empty() {
            return Ok(());
        }
        let record: Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        if !record["row"].is_u64() {
            return Err(bad("no row number".into()));
        }
        rows.push(row_of(&record, &sources, &schema));
        written += 1;
        if rows.len() == DECODE_ROWS {
            flush(&mut rows, &mut writer)?;
        }
        Ok(())
    })?;
    if !rows.is_empty() {
        flush(&mut rows, &mut writer)?;
    }
    writer.close().map_err(|e| arrow(e.to_string()))?;
    pending.commit()?;
    Ok(written)
}

/// The table's fields and where each comes from, names never twice.
fn layout(input: Vec<Field>, data: Vec<Field>) -> (SchemaRef, Vec<Source>) {
    let mut fields: Vec<Field> = vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("id", DataType::Utf8, true),
    ];
    let mut sources = vec![Source::Row, Source::Id];
    let mut taken: Vec<String> = vec!["row".into(), "id".into()];
    let tail = [
        ("completion", DataType::Utf8, Source::Completion),
        ("variants", DataType::Utf8, Source::Variants),
        (
            "prompt_tokens",
            DataType::UInt64,
            Source::Usage("prompt_tokens"),
        ),
        (
            "completion_tokens",
            DataType::UInt64,
            Source::Usage("completion_tokens"),
        ),
        (
            "total_tokens",
            DataType::UInt64,
            Source::Usage("total_tokens"),
        ),
        (
            "cached_tokens",
            DataType::UInt64,
            Source::Usage("cached_tokens"),
        ),
        ("cost_usd", DataType::Float64, Source::Cost),
        ("status", DataType::Utf8, Source::Status),
        ("error", DataType::Utf8, Source::Error),
        ("error_kind", DataType::Utf8, Source::ErrorKind),
    ];
    taken.extend(tail.iter().map(|(n, ..)| n.to_string()));
    let mut add = |prefix: &str, f: Field, src: Source, fields: &mut Vec<Field>| {
        let name = if taken.contains(f.name()) {
            format!("{prefix}.{}", f.name())
        } else {
            f.name().clone()
        };
        taken.push(name.clone());
        fields.push(f.with_name(name));
        sources.push(src);
    };
    for f in input {
        let src = Source::Input(f.name().clone());
        add("input", f, src, &mut fields);
    }
    for f in data {
        let src = Source::Data(f.name().clone());
        add("data", f, src, &mut fields);
    }
    for (name, t, src) in tail {
        fields.push(Field::new(name, t, true));
        sources.push(src);
    }
    (Arc::new(Schema::new(fields)), sources)
}

/// One record as the decoder takes it: each column's value under its name, fitted to its type.
fn row_of(record: &Value, sources: &[Source], schema: &Schema) -> Value {
    let mut m = Map::with_capacity(sources.len());
    for (src, f) in sources.iter().zip(schema.fields()) {
        let v = match src {
            Source::Row => record["row"].clone(),
            Source::Id => record["id"].clone(),
            Source::Input(k) => record["input"].get(k).cloned().unwrap_or(Value::Null),
            Source::Data(k) => record["data"].get(k).cloned().unwrap_or(Value::Null),
            Source::Completion => record["completion"].clone(),
            Source::Variants => match &record["variants"] {
                Value::Null => Value::Null,
                v => Value::String(v.to_string()),
            },
            Source::Usage(k) => record["usage"][*k].clone(),
            Source::Cost => record["cost_usd"].clone(),
            Source::Status => record["status"].clone(),
            Source::Error => record["error"]["message"].clone(),
            Source::ErrorKind => record["error"]["kind"].clone(),
        };
        m.insert(f.name().clone(), fit(v, f.data_type()));
    }
    Value::Object(m)
}

/// A value as a column of type `t` holds it: text where text is wanted (an object or array
/// as its JSON), null where it cannot be that type.
fn fit(v: Value, t: &DataType) -> Value {
    match (t, v) {
        (_, Value::Null) => Value::Null,
        (DataType::Utf8, Value::String(s)) => Value::String(s),
        (DataType::Utf8, v) => Value::String(v.to_string()),
        (DataType::Boolean, v @ Value::Bool(_)) => v,
        (DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64, v) if v.is_i64() => {
            v
        }
        (DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64, v)
            if v.is_u64() =>
        {
            v
        }
        (DataType::Float32 | DataType::Float64, v @ Value::Number(_)) => v,
        (DataType::List(item), Value::Array(a)) | (DataType::LargeList(item), Value::Array(a)) => {
            Value::Array(a.into_iter().map(|x| fit(x, item.data_type())).collect())
        }
        (DataType::Struct(fields), Value::Object(mut o)) => Value::Object(
            fields
                .iter()
                .map(|f| {
                    let x = o.remove(f.name()).unwrap_or(Value::Null);
                    (f.name().clone(), fit(x, f.data_type()))
                })
                .collect(),
        ),
        // Dates, timestamps and decimals: as the input had them (ISO text, exact text).
        (
            DataType::Date32 | DataType::Timestamp(..) | DataType::Decimal128(..),
            v @ Value::String(_),
        ) => v,
        _ => Value::Null,
    }
}

/// A Parquet input's field as the table holds it: its own type where the records' values
/// decode back into it exactly, else text (a binary's base64, a time of day, a map's JSON).
fn plain(f: &Field) -> Field {
    Field::new(f.name(), plain_type(f.data_type()), true)
}

fn plain_type(t: &DataType) -> DataType {
    match t {
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal128(..)
        | DataType::Timestamp(_, None)
        | DataType::Date32 => t.clone(),
        // The records hold the instant in UTC (`…Z`): the column says so as an offset, which
        // needs no time-zone database to read.
        DataType::Timestamp(unit, Some(_)) => DataType::Timestamp(*unit, Some("+00:00".into())),
        DataType::Float16 => DataType::Float32,
        DataType::Date64 => DataType::Date32,
        DataType::Dictionary(_, v) => plain_type(v),
        DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
            DataType::List(Arc::new(Field::new(
                "item",
                plain_type(item.data_type()),
                true,
            )))
        }
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(|f| plain(f)).collect::<Fields>())
        }
        _ => DataType::Utf8,
    }
}

/// A JSON Schema's top-level properties as columns.
fn schema_fields(s: &Value) -> Vec<Field> {
    s.get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(name, p)| Field::new(name, json_type(p), true))
        .collect()
}

/// A JSON Schema's type as a column's: an object with properties as a struct, an array as a
/// list of its items, anything else not a plain scalar as text.
fn json_type(s: &Value) -> DataType {
    let t = match &s["type"] {
        Value::String(t) => t.as_str(),
        // ["string", "null"]: the type that is not null.
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or(""),
        _ => "",
    };
    match t {
        "integer" => DataType::Int64,
        "number" => DataType::Float64,
        "boolean" => DataType::Boolean,
        "array" => DataType::List(Arc::new(Field::new("item", json_type(&s["items"]), true))),
        "object" => match s["properties"].as_object() {
            Some(p) if !p.is_empty() => DataType::Struct(
                p.iter()
                    .map(|(k, v)| Field::new(k, json_type(v), true))
                    .collect::<Fields>(),
            ),
            _ => DataType::Utf8,
        },
        _ => DataType::Utf8,
    }
}

/// The keys of the records' `input` or `data` objects, in first-seen order, each typed by
/// its values: integers, numbers (integers and floats mixed), booleans, else text.
fn infer(jsonl: &Path, part: &str) -> Result<Vec<Field>, Error> {
    let mut cols: Vec<(String, DataType)> = Vec::new();
    for_each_line(jsonl, |_, _, bytes| {
        let Ok(Some(l)) = parse_line(bytes) else {
            return Ok(()); // the writing pass reports it
        };
        let raw = if part == "input" { l.input } else { l.data };
        let Some(raw) = raw else { return Ok(()) };
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(raw.get()) else {
            return Ok(());
        };
        for (k, v) in m {
            let t = match &v {
                Value::Null => continue,
                Value::Bool(_) => DataType::Boolean,
                v if v.is_i64() => DataType::Int64,
                Value::Number(_) => DataType::Float64,
                _ => DataType::Utf8,
            };
            match cols.iter_mut().find(|(n, _)| *n == k) {
                Some((_, have)) if *have == t => {}
                Some((_, have)) => {
                    *have = match (&*have, &t) {
                        (DataType::Int64, DataType::Float64)
                        | (DataType::Float64, DataType::Int64) => DataType::Float64,
                        _ => DataType::Utf8,
                    }
                }
                None => cols.push((k, t)),
            }
        }
        Ok(())
    })?;
    Ok(cols
        .into_iter()
        .map(|(n, t)| Field::new(n, t, true))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jsonl_inputs_columns_are_typed_by_their_values() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o.jsonl");
        std::fs::write(
            &out,
            concat!(
                r#"{"row":1,"id":"1","status":"error","input":{"n":1,"x":1,"b":true,"s":"a","o":{"k":1}}}"#,
                "\n",
                r#"{"row":2,"id":"2","status":"error","input":{"n":2,"x":1.5,"b":false,"s":"b","o":[1]}}"#,
                "\n"
            ),
        )
        .unwrap();
        let types: Vec<(String, DataType)> = infer(&out, "input")
            .unwrap()
            .into_iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        let want = [
            ("n", DataType::Int64),
            ("x", DataType::Float64),
            ("b", DataType::Boolean),
            ("s", DataType::Utf8),
            ("o", DataType::Utf8),
        ];
        assert_eq!(
            types,
            want.map(|(n, t)| (n.to_string(), t)).to_vec(),
            "integers and floats mixed are numbers, anything nested is text"
        );
    }
}
