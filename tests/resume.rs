//! Reruns: after kill -9, of a finished job, after an input change, `--retry-failed` and
//! `--fresh`, and a second run on an output that one is writing.

use std::time::{Duration, Instant};

use crate::util::*;

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
    let done_before = texts_in(&out);
    assert!(done_before.len() >= 60 && done_before.len() < 300);
    rerun_repays_nothing(&f, &s, job.to_str().unwrap(), "8", 300, &done_before);
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
