//! Parquet input through the real binary: every common Arrow type as a template value, only the
//! columns the job reads decoded, a folder of part files read in order as one dataset, a
//! value of a type promptmill cannot read failing its row by column and type, and a named
//! column the file lacks refused before anything is sent.

use std::sync::Arc;

use ::parquet::arrow::ArrowWriter;
use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::types::Int32Type;
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, DictionaryArray,
    DurationSecondArray, Float64Array, Int64Array, RecordBatch, StringArray, StructArray,
    TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field};

use crate::util::*;

fn write_parquet(path: &std::path::Path, batch: &RecordBatch) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// Two products with a column of every kind a dataset commonly holds.
fn products() -> RecordBatch {
    let mut tags = ListBuilder::new(StringBuilder::new());
    tags.values().append_value("warm");
    tags.values().append_value("wool");
    tags.append(true);
    tags.append(true); // an empty list
    let meta = StructArray::from(vec![
        (
            Arc::new(Field::new("brand", DataType::Utf8, false)),
            Arc::new(StringArray::from(vec!["Acme", "Zed"])) as ArrayRef,
        ),
        (
            Arc::new(Field::new("rating", DataType::Float64, false)),
            Arc::new(Float64Array::from(vec![4.5, 3.0])) as ArrayRef,
        ),
    ]);
    let category: DictionaryArray<Int32Type> = vec!["socks", "hats"].into_iter().collect();
    RecordBatch::try_from_iter(vec![
        (
            "sku",
            Arc::new(Int64Array::from(vec![101, 102])) as ArrayRef,
        ),
        (
            "title",
            Arc::new(StringArray::from(vec!["Boots", "Hat"])) as ArrayRef,
        ),
        (
            "price",
            Arc::new(
                Decimal128Array::from(vec![1999i128, 500])
                    .with_precision_and_scale(10, 2)
                    .unwrap(),
            ) as ArrayRef,
        ),
        (
            "in_stock",
            Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef,
        ),
        // 2026-01-01 and 2026-02-01, days since the epoch.
        (
            "released",
            Arc::new(Date32Array::from(vec![20454, 20485])) as ArrayRef,
        ),
        (
            "updated",
            Arc::new(
                TimestampMillisecondArray::from(vec![1_767_258_000_250, 1_767_258_000_000])
                    .with_timezone("UTC"),
            ) as ArrayRef,
        ),
        ("tags", Arc::new(tags.finish()) as ArrayRef),
        ("meta", Arc::new(meta) as ArrayRef),
        (
            "note",
            Arc::new(StringArray::from(vec![Some("limited"), None])) as ArrayRef,
        ),
        ("category", Arc::new(category) as ArrayRef),
        (
            "blob",
            Arc::new(BinaryArray::from(vec![
                b"\x00\x01".as_ref(),
                b"\x02".as_ref(),
            ])) as ArrayRef,
        ),
    ])
    .unwrap()
}

const TEMPLATE: &str =
    "{{ title }} | {{ price }} | {{ in_stock }} | {{ released }} | {{ updated }} | \
{% for t in tags %}[{{ t }}]{% endfor %} | {{ meta.brand }} {{ meta.rating }} | \
{% if note %}{{ note }}{% else %}no note{% endif %} | {{ category }}";

#[test]
fn parquet_rows_carry_every_common_type_as_a_template_value_and_only_what_the_job_reads() {
    let s = server();
    let f = Fixture::new();
    write_parquet(&f.path("data/products.parquet"), &products());
    let job = f.job("data/products.parquet", TEMPLATE, "", "", &s.base_url());
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "path = \"data/products.parquet\"",
        "path = \"data/products.parquet\"\nid = \"sku\"",
    );
    std::fs::write(&job, text).unwrap();
    ok(&f.run(&["run", job.to_str().unwrap()]));
    let mut users = user_texts(&s);
    users.sort();
    assert_eq!(
        users[0],
        "Boots | 19.99 | true | 2026-01-01 | 2026-01-01T09:00:00.25Z | [warm][wool] | Acme 4.5 | limited | socks"
    );
    assert_eq!(
        users[1],
        "Hat | 5.00 | false | 2026-02-01 | 2026-01-01T09:00:00Z |  | Zed 3 | no note | hats"
    );
    let recs = f.records();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["id"], "101", "an integer id column");
    let input = recs[0]["input"].as_object().unwrap();
    assert!(
        input.get("blob").is_none(),
        "a column no message mentions is not decoded: {input:?}"
    );
    assert_eq!(input["tags"], serde_json::json!(["warm", "wool"]));
    assert_eq!(input["meta"]["rating"], 4.5);
    assert!(
        recs[1]["input"].get("note").is_none(),
        "a null is a missing field"
    );
}

#[test]
fn a_folder_of_parts_is_one_dataset_and_an_unreadable_type_fails_its_row_by_name() {
    let s = server();
    let f = Fixture::new();
    let part = |titles: Vec<&str>, secs: Vec<i64>| {
        RecordBatch::try_from_iter(vec![
            ("title", Arc::new(StringArray::from(titles)) as ArrayRef),
            (
                "wait",
                Arc::new(DurationSecondArray::from(secs)) as ArrayRef,
            ),
        ])
        .unwrap()
    };
    write_parquet(
        &f.path("data/parts/part-0.parquet"),
        &part(vec!["a", "b"], vec![1, 2]),
    );
    write_parquet(
        &f.path("data/parts/part-1.parquet"),
        &part(vec!["c"], vec![3]),
    );
    f.write("data/parts/_SUCCESS", "");
    // Only part 1's template reads the duration column.
    let job = f.job("data/parts", "{{ title }}", "", "", &s.base_url());
    ok(&f.run(&["run", job.to_str().unwrap()]));
    let recs = f.records();
    assert_eq!(recs.len(), 3);
    let titles: Vec<&str> = recs
        .iter()
        .map(|r| r["input"]["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        titles,
        vec!["a", "b", "c"],
        "parts in name order, rows numbered across them"
    );
    assert_eq!(recs[2]["row"], 3);

    let job = f.job(
        "data/parts",
        "{{ title }} after {{ wait }}",
        "",
        "",
        &s.base_url(),
    );
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("out/result", "out/waits");
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = read_jsonl(&f.path("out/waits.jsonl"));
    assert_eq!(recs.len(), 3);
    let msg = recs[0]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("part-0.parquet") && msg.contains("`wait`") && msg.contains("Duration"),
        "{msg}"
    );
    assert!(recs.iter().all(|r| r["status"] == "error"));
}

#[test]
fn a_named_column_the_file_lacks_is_refused_before_anything_is_sent() {
    let s = server();
    let f = Fixture::new();
    write_parquet(&f.path("data/p.parquet"), &products());
    let job = f.job("data/p.parquet", "{{ title }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "path = \"data/p.parquet\"",
        "path = \"data/p.parquet\"\ncolumns = [\"title\", \"colour\"]",
    );
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("`colour`") && r.stderr.contains("p.parquet"),
        "{}",
        r.stderr
    );
    assert_eq!(s.stats().requests, 0);
    // Named columns are all a row carries.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace(", \"colour\"", ", \"sku\"");
    std::fs::write(&job, text).unwrap();
    ok(&f.run(&["run", job.to_str().unwrap()]));
    let keys: Vec<String> = f.records()[0]["input"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, vec!["sku", "title"]);
}

/// Every record of a Parquet file, as JSON objects (the `parquet` crate's own reader).
fn read_parquet(path: &std::path::Path) -> (arrow_schema::SchemaRef, Vec<RecordBatch>) {
    let f = std::fs::File::open(path).unwrap();
    let b = ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
    let schema = b.schema().clone();
    let batches = b.build().unwrap().map(Result::unwrap).collect();
    (schema, batches)
}

fn type_of(schema: &arrow_schema::Schema, name: &str) -> DataType {
    schema
        .field_with_name(name)
        .unwrap_or_else(|_| panic!("no column {name} in {schema:?}"))
        .data_type()
        .clone()
}

#[test]
fn the_parquet_output_is_typed_keeps_a_parquet_inputs_types_and_the_schemas_fields() {
    use arrow_array::cast::AsArray;
    let s = server();
    let f = Fixture::new();
    write_parquet(&f.path("data/products.parquet"), &products());
    f.write(
        "schemas/ad.json",
        r#"{"type": "object", "properties": {"headline": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "score": {"type": "integer"}},
            "required": ["headline", "tags", "score"], "additionalProperties": false}"#,
    );
    let job = f.job("data/products.parquet", TEMPLATE, "", "", &s.base_url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_tokens = 20", "max_tokens = 300")
        .replace("path = \"data/products.parquet\"", "path = \"data/products.parquet\"\nid = \"sku\"")
        .replace(
        "csv = \"out/result.csv\"",
        "csv = \"out/result.csv\"\nparquet = \"out/result.parquet\"\nschema = \"schemas/ad.json\"",
    );
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{} {:?}", r.stderr, f.records());
    let recs = f.records();
    let (schema, batches) = read_parquet(&f.path("out/result.parquet"));
    assert_eq!(
        batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
        recs.len()
    );
    // The input's own types.
    assert_eq!(type_of(&schema, "sku"), DataType::Int64);
    assert_eq!(type_of(&schema, "price"), DataType::Decimal128(10, 2));
    assert_eq!(type_of(&schema, "in_stock"), DataType::Boolean);
    assert_eq!(type_of(&schema, "released"), DataType::Date32);
    assert!(matches!(
        type_of(&schema, "updated"),
        DataType::Timestamp(_, Some(_))
    ));
    assert!(matches!(type_of(&schema, "tags"), DataType::List(_)));
    assert!(matches!(type_of(&schema, "meta"), DataType::Struct(_)));
    assert_eq!(
        type_of(&schema, "category"),
        DataType::Utf8,
        "a dictionary's values"
    );
    assert!(
        schema.field_with_name("blob").is_err(),
        "a column not read is not written"
    );
    // The schema's fields, typed; a name the input has already gets the data prefix.
    assert_eq!(type_of(&schema, "headline"), DataType::Utf8);
    assert!(matches!(type_of(&schema, "data.tags"), DataType::List(_)));
    assert_eq!(type_of(&schema, "score"), DataType::Int64);
    assert_eq!(type_of(&schema, "prompt_tokens"), DataType::UInt64);
    assert_eq!(type_of(&schema, "cost_usd"), DataType::Float64);
    let b = &batches[0];
    let col = |n: &str| b.column(schema.index_of(n).unwrap()).clone();
    assert_eq!(
        col("price")
            .as_primitive::<arrow_array::types::Decimal128Type>()
            .value(0),
        1999
    );
    assert_eq!(
        col("released")
            .as_primitive::<arrow_array::types::Date32Type>()
            .value(1),
        20485
    );
    assert_eq!(col("status").as_string::<i32>().value(0), "ok");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(
            col("row")
                .as_primitive::<arrow_array::types::UInt64Type>()
                .value(i),
            r["row"].as_u64().unwrap()
        );
        assert_eq!(
            col("headline").as_string::<i32>().value(i),
            r["data"]["headline"].as_str().unwrap()
        );
        assert_eq!(
            col("prompt_tokens")
                .as_primitive::<arrow_array::types::UInt64Type>()
                .value(i),
            r["usage"]["prompt_tokens"].as_u64().unwrap()
        );
        let cost = col("cost_usd")
            .as_primitive::<arrow_array::types::Float64Type>()
            .value(i);
        assert!((cost - r["cost_usd"].as_f64().unwrap()).abs() < 1e-15);
    }
}

#[test]
fn shards_merge_into_one_parquet_table_in_input_order() {
    use arrow_array::cast::AsArray;
    let s = server();
    let f = Fixture::new();
    let rows = texts(30, "item");
    f.write("data.csv", csv_of(&rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    for k in 1..=3 {
        ok(&f.run(&["run", "--quiet", job, "--shard", &format!("{k}/3")]));
    }
    let r = f.run(&[
        "merge",
        "out/result.shard-*.jsonl",
        "-o",
        "out/all.jsonl",
        "--parquet",
        "out/all.parquet",
    ]);
    ok(&r);
    assert!(r.stderr.contains("Parquet of 30 records"), "{}", r.stderr);
    let (schema, batches) = read_parquet(&f.path("out/all.parquet"));
    let texts: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column(schema.index_of("text").unwrap())
                .as_string::<i32>()
                .clone();
            (0..c.len())
                .map(move |i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(texts, rows, "every row once, in input order");
    assert_eq!(type_of(&schema, "completion"), DataType::Utf8);
}

#[test]
fn parquet_is_not_read_from_a_pipe() {
    let s = server();
    let f = Fixture::new();
    let job = f.job("-", "{{ title }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("path = \"-\"", "path = \"-\"\nformat = \"parquet\"");
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("Parquet cannot be read from stdin"),
        "{}",
        r.stderr
    );
    assert_eq!(s.stats().requests, 0);
}
