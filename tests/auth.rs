//! The API key: refusals (401, 403, insufficient quota) that stop the job, the rerun after one,
//! the key never leaking, a key in the job file, a missing key, `.env`.

use serde_json::Value;

use crate::util::*;

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
