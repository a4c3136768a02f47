//! Input rows: bad CSV and JSONL rows fail alone with their file, line and field; stdin,
//! `--limit` and the id column.

use crate::util::*;

#[test]
fn bad_rows_fail_alone_with_file_line_and_field_and_the_job_goes_on() {
    let s = server();
    let f = Fixture::new();
    let mut csv = b"id,text,extra\nr1,fine,x\nr2,\"unterminated,x\nr3,only-two\n".to_vec();
    csv.extend_from_slice(b"r4,bad \xff utf8,x\nr5,also fine,y\n");
    f.write("data.csv", &csv);
    let job = f.job(
        "data.csv",
        "{{ text }} {{ missing_field }}",
        "",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    assert!(recs.iter().all(|r| r["status"] == "error"));
    let msg = |i: usize| recs[i]["error"]["message"].as_str().unwrap().to_string();
    assert!(msg(0).contains("missing_field"), "{}", msg(0));
    assert!(msg(0).contains("row 1"), "{}", msg(0));

    // JSONL: a line that is not an object, invalid JSON, invalid UTF-8; the good rows run.
    let f = Fixture::new();
    let mut jl = b"{\"t\": \"one\"}\n[1,2]\n{not json}\n".to_vec();
    jl.extend_from_slice(b"{\"t\": \"\xfe\"}\n{\"t\": \"five\"}\n");
    f.write("data.jsonl", &jl);
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 5);
    let status: Vec<&str> = recs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "error", "error", "error", "ok"]);
    let m = |i: usize| recs[i]["error"]["message"].as_str().unwrap().to_string();
    assert!(
        m(1).contains("data.jsonl") && m(1).contains("line 2") && m(1).contains("JSON object"),
        "{}",
        m(1)
    );
    assert!(
        m(2).contains("line 3") && m(2).contains("invalid JSON"),
        "{}",
        m(2)
    );
    assert!(
        m(3).contains("line 4") && m(3).contains("field `t` is not valid UTF-8"),
        "{}",
        m(3)
    );
}

#[test]
fn csv_malformed_records_and_bad_utf8_name_line_and_field() {
    let s = server();
    let f = Fixture::new();
    let mut csv = b"id,text\nr1,fine\nr2,too,many\n".to_vec();
    csv.extend_from_slice(b"r3,bad \xff utf8\nr4,also fine\n");
    f.write("data.csv", &csv);
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    let status: Vec<&str> = recs.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "error", "error", "ok"]);
    let m = |i: usize| recs[i]["error"]["message"].as_str().unwrap().to_string();
    assert!(
        m(1).contains("data.csv") && m(1).contains("line 3") && m(1).contains("3 fields"),
        "{}",
        m(1)
    );
    assert!(
        m(2).contains("line 4") && m(2).contains("field `text`") && m(2).contains("UTF-8"),
        "{}",
        m(2)
    );
}

#[test]
fn input_from_stdin_limit_and_id_column() {
    let s = server();
    let f = Fixture::new();
    let job = f.job("-", "{{ text }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job).unwrap().replace(
            "path = \"-\"",
            "path = \"-\"\nformat = \"csv\"\nid = \"id\"",
        ),
    )
    .unwrap();
    let mut c = f.cmd(&["run", job.to_str().unwrap(), "--limit", "4"]);
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(csv_rows(10).as_bytes())
        .unwrap();
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[3]["id"], "r4");
}
