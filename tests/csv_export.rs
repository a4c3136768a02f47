//! The CSV export through the real binary: every input column, every row, no duplicate header,
//! formula cells escaped on request.

use crate::util::*;

/// The export's output columns, in order, when no input column clashes with them.
const OUTPUT_COLUMNS: [&str; 7] = [
    "completion",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "status",
    "error",
];

/// The CSV export as rows of cells, the header first.
fn read_csv(f: &Fixture) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(f.path("out/result.csv"))
        .unwrap()
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect()
}

/// The cell of `row` under the header column `col`.
fn cell<'a>(rows: &'a [Vec<String>], row: usize, col: &str) -> &'a str {
    let i = rows[0].iter().position(|c| c == col).unwrap();
    &rows[row][i]
}

/// The usual test job, with `csv_escape_formulas = true` in `[output]` when `escape`.
fn job_with_escape(f: &Fixture, input: &str, base_url: &str, escape: bool) -> std::path::PathBuf {
    let job = f.job(input, "{{ text }}", "", "", base_url);
    if escape {
        // `[output]` is the job file's last table, so an appended key lands in it.
        let text = std::fs::read_to_string(&job).unwrap() + "csv_escape_formulas = true\n";
        f.write("job.toml", text);
    }
    job
}

#[test]
fn an_unreadable_first_jsonl_row_keeps_every_input_column_and_every_row() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write(
        "data.jsonl",
        "{not json}\n{\"text\": \"one\", \"a\": \"1\"}\n{\"text\": \"two\", \"b\": 2}\n",
    );
    let job = f.job("data.jsonl", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let rows = read_csv(&f);
    let mut want = vec!["text", "a", "b"];
    want.extend(OUTPUT_COLUMNS);
    assert_eq!(rows[0], want);
    assert_eq!(rows.len(), 4, "a line per input row: {rows:?}");
    assert_eq!(cell(&rows, 1, "status"), "error");
    assert_eq!(cell(&rows, 1, "text"), "");
    let err = cell(&rows, 1, "error");
    assert!(
        err.contains("line 1") && err.contains("invalid JSON"),
        "{err}"
    );
    assert_eq!(cell(&rows, 2, "text"), "one");
    assert_eq!(cell(&rows, 2, "a"), "1");
    assert_eq!(cell(&rows, 2, "completion"), "echo: one");
    assert_eq!(cell(&rows, 3, "b"), "2");
    assert_eq!(cell(&rows, 3, "completion"), "echo: two");
    assert_eq!(cell(&rows, 3, "status"), "ok");
}

#[test]
fn a_malformed_first_csv_row_keeps_the_headers_columns() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "id,text,extra\nr1,too,many,fields\nr2,two,x\n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let rows = read_csv(&f);
    let mut want = vec!["id", "text", "extra"];
    want.extend(OUTPUT_COLUMNS);
    assert_eq!(rows[0], want);
    assert_eq!(rows.len(), 3);
    assert_eq!(cell(&rows, 1, "status"), "error");
    assert_eq!(cell(&rows, 2, "completion"), "echo: two");
}

#[test]
fn an_input_column_named_completion_renames_the_output_column() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "id,completion,text\nr1,mine,hello\n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rows = read_csv(&f);
    let header = &rows[0];
    let unique: std::collections::HashSet<&String> = header.iter().collect();
    assert_eq!(unique.len(), header.len(), "duplicate header: {header:?}");
    assert_eq!(
        header[..4],
        ["id", "completion", "text", "promptmill_completion"]
    );
    assert_eq!(cell(&rows, 1, "completion"), "mine", "the input's own cell");
    assert_eq!(cell(&rows, 1, "promptmill_completion"), "echo: hello");
    assert!(
        r.stderr.contains("`completion`") && r.stderr.contains("`promptmill_completion`"),
        "the rename is logged: {}",
        r.stderr
    );
}

#[test]
fn csv_escape_formulas_quotes_a_formula_cell() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "id,text\nr1,\"=HYPERLINK(\"\"x\"\")\"\n");
    let job = job_with_escape(&f, "data.csv", &s.base_url(), true);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rows = read_csv(&f);
    assert_eq!(cell(&rows, 1, "text"), "'=HYPERLINK(\"x\")");
    assert_eq!(cell(&rows, 1, "status"), "ok");
}

#[test]
fn formula_cells_are_unchanged_by_default() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "id,text\nr1,\"=HYPERLINK(\"\"x\"\")\"\n");
    let job = job_with_escape(&f, "data.csv", &s.base_url(), false);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rows = read_csv(&f);
    assert_eq!(cell(&rows, 1, "text"), "=HYPERLINK(\"x\")");
}
