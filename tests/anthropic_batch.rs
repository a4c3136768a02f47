//! Claude on Anthropic's Message Batches through the real binary, against the fake server's
//! `/v1/messages/batches`: the requests inline with ids that fit the API's pattern, results
//! streamed from `results_url` at half price with the cache's reads and writes, a kill between
//! any two steps, a create whose answer is lost (found again, never made twice, even when
//! another batch of the same size could be it), expiry, cancellation and errored requests.
//! Each test counts what the server billed against what the output kept.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::anthropic::{billed_equals_kept, claude_job, cost_of, run};
use crate::util::*;

/// A Claude job in batch mode over `rows`, polling fast.
fn batch_job(f: &Fixture, s: &FakeServer, rows: &[String], batch: &str) -> String {
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let j = claude_job(f, s, &rows, "", "");
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("[run]\n", "[run]\nmode = \"batch\"\n");
    std::fs::write(&j, format!("{text}\n[batch]\npoll_s = 0.05\n{batch}\n")).unwrap();
    j
}

fn ok_run(f: &Fixture, args: &[&str]) -> Ran {
    let r = run(f, args);
    assert_eq!(
        r.code, 0,
        "{args:?}\nstdout: {}\nstderr: {}",
        r.stdout, r.stderr
    );
    r
}

/// The texts the records answered, as the fake server echoes them.
fn answered(f: &Fixture) -> BTreeSet<String> {
    f.records()
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| r["input"]["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn all(rows: &[String]) -> BTreeSet<String> {
    rows.iter().cloned().collect()
}

#[test]
fn a_claude_batch_goes_inline_comes_back_at_half_price_and_caches_the_shared_prefix() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Default::default()
    });
    let f = Fixture::new();
    let rows = texts(3, "item");
    let j = batch_job(&f, &s, &rows, "");
    let r = ok_run(&f, &["run", &j]);
    assert!(r.stderr.contains("batch collect"), "{}", r.stderr);
    let st = s.stats();
    assert_eq!(
        (st.requests, st.files_uploaded),
        (0, 0),
        "nothing online, no upload"
    );
    assert_eq!(st.batches_created, 1);
    let b = &s.message_batches()[0];
    assert_eq!(b["processing_status"], "in_progress");

    // Each request: an id within the API's pattern, the online params without `stream`, the
    // cache breakpoint after the shared system prompt.
    let reqs = s.message_batch_requests();
    assert_eq!(reqs.len(), 3);
    let mut ids = BTreeSet::new();
    for q in &reqs {
        let id = q["custom_id"].as_str().unwrap();
        assert!(
            (1..=64).contains(&id.len())
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{id}"
        );
        ids.insert(id.to_string());
        let p = &q["params"];
        assert_eq!(
            (p["model"].as_str(), p["max_tokens"].as_u64()),
            (Some("claude-sonnet-4-5"), Some(200))
        );
        assert!(p.get("stream").is_none());
        assert_eq!(p["system"][0]["cache_control"]["type"], "ephemeral");
    }
    assert_eq!(ids.len(), 3, "custom_ids are unique");

    let st_out = ok_run(&f, &["batch", "status", &j]);
    assert!(st_out.stdout.contains("in_progress"), "{}", st_out.stdout);
    // A rerun while it runs submits nothing.
    ok_run(&f, &["run", &j]);
    assert_eq!(s.stats().batches_created, 1);

    s.complete_batches();
    ok_run(&f, &["batch", "collect", &j]);
    let recs = f.records();
    assert_eq!(recs.len(), 3);
    assert_eq!(answered(&f), all(&rows));
    // The first request processed wrote the cache; the others read it. Every token at half
    // Claude's list price, the cache's too.
    let (mut wrote, mut read) = (0, 0);
    for r in &recs {
        assert_eq!(r["status"], "ok");
        let u = &r["usage"];
        wrote += u64::from(u["cache_write_tokens"].as_u64().unwrap_or(0) > 0);
        read += u64::from(u["cached_tokens"].as_u64().unwrap_or(0) > 0);
        let cost = r["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - cost_of(u) / 2.0).abs() < 1e-12,
            "{cost} vs {}",
            cost_of(u) / 2.0
        );
    }
    assert_eq!((wrote, read), (1, 2));
    billed_equals_kept(&s, &f);
    // The key is in no file the run wrote.
    for p in walk(&f.path("out")) {
        let text = std::fs::read(&p).unwrap();
        assert!(
            !String::from_utf8_lossy(&text).contains(KEY),
            "{}",
            p.display()
        );
    }
    // Done: a rerun sends nothing.
    ok_run(&f, &["run", &j]);
    assert_eq!(s.stats().batches_created, 1);
    assert_eq!(s.stats().batch_requests_billed, 3);
}

/// Every step, and a kill right after it is on record: the next command picks up from the
/// record, submits nothing twice and loses nothing.
#[test]
fn a_kill_between_any_two_steps_submits_no_message_batch_twice() {
    for step in BATCH_STEPS {
        let s = spawn_background(Config::default());
        let f = Fixture::new();
        let rows = texts(12, "item");
        let j = batch_job(&f, &s, &rows, "max_requests_per_file = 5");
        batch_killed_at(&f, &s, &j, step, &[("ANTHROPIC_API_KEY", KEY)]);
        let st = s.stats();
        assert_eq!(
            st.batches_created, 3,
            "{step}: 12 rows in batches of 5, each once"
        );
        assert_eq!(
            st.batch_requests_billed, 12,
            "{step}: every row billed once"
        );
        assert_eq!(answered(&f), all(&rows), "{step}");
        assert_eq!(f.records().len(), 12, "{step}");
        billed_equals_kept(&s, &f);
    }
}

#[test]
fn a_create_whose_answer_is_lost_is_found_by_its_size_and_time_and_never_made_twice() {
    let s = spawn_background(Config {
        batch_auto_advance: true,
        batch_create_answers_lost: 3,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(30, "item");
    let j = batch_job(&f, &s, &rows, "max_requests_per_file = 10");
    ok_run(&f, &["run", "--wait", &j]);
    let st = s.stats();
    assert_eq!(st.batches_created, 3, "30 rows in batches of 10, each once");
    assert_eq!(st.batch_requests_billed, 30);
    assert_eq!(answered(&f), all(&rows));
    billed_equals_kept(&s, &f);
}

/// Two outputs killed right after their creates, with batches of the same size: neither can
/// tell from the listing which batch is its own, so neither submits again; once the batches
/// have ended, each finds its own by the ids in the results.
#[test]
fn two_batches_that_could_be_a_lost_create_are_told_apart_by_their_results_never_resent() {
    let s = spawn_background(Config::default());
    let (a, b) = (Fixture::new(), Fixture::new());
    let (rows_a, rows_b) = (texts(4, "apple"), texts(4, "berry"));
    let ja = batch_job(&a, &s, &rows_a, "");
    let jb = batch_job(&b, &s, &rows_b, "");
    for (f, j) in [(&b, &jb), (&a, &ja)] {
        let r = f
            .cmd(&["run", j])
            .env("ANTHROPIC_API_KEY", KEY)
            .env("PROMPTMILL_FAILPOINT", "batch:create-done")
            .output()
            .unwrap();
        assert!(!r.status.success(), "the failpoint killed it");
    }
    assert_eq!(s.stats().batches_created, 2);
    // Both batches are candidates for each output, and both still run: no guess, no resend.
    let r = run(&a, &["run", &ja]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("could"), "{}", r.stderr);
    assert_eq!(s.stats().batches_created, 2);

    s.complete_batches();
    for (f, j) in [(&a, &ja), (&b, &jb)] {
        ok_run(f, &["run", j]);
        ok_run(f, &["batch", "collect", j]);
    }
    assert_eq!(answered(&a), all(&rows_a));
    assert_eq!(answered(&b), all(&rows_b));
    let st = s.stats();
    assert_eq!((st.batches_created, st.batch_requests_billed), (2, 8));
    let kept: u64 = a
        .records()
        .iter()
        .chain(&b.records())
        .map(|r| r["usage"]["completion_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(st.billed_completion_tokens, kept, "billed vs kept");
}

#[test]
fn an_expired_or_cancelled_batch_keeps_what_ran_and_the_rest_is_sent_once() {
    for end in ["expire", "cancel"] {
        let s = spawn_background(Config {
            batch_lines_per_step: Some(2),
            ..Config::default()
        });
        let f = Fixture::new();
        let rows = texts(6, "item");
        let j = batch_job(&f, &s, &rows, "");
        ok_run(&f, &["run", &j]);
        s.advance_batches(); // two requests answered
        if end == "expire" {
            s.expire_batches();
        } else {
            let r = ok_run(&f, &["batch", "cancel", &j]);
            assert!(r.stdout.contains("cancelling"), "{}", r.stdout);
            s.advance_batches(); // canceling → ended, the rest canceled
            assert_eq!(s.stats().batches_cancelled, 1);
        }
        ok_run(&f, &["batch", "collect", &j]);
        assert_eq!(
            f.records().len(),
            2,
            "{end}: what ran is kept, it was billed"
        );
        assert_eq!(f.summary()["rows_pending"], 4, "{end}");
        billed_equals_kept(&s, &f);
        ok_run(&f, &["run", &j]);
        assert_eq!(
            s.message_batch_requests().len(),
            10,
            "{end}: only the four resent"
        );
        s.complete_batches();
        ok_run(&f, &["batch", "collect", &j]);
        assert_eq!(answered(&f), all(&rows), "{end}");
        assert_eq!(s.stats().batch_requests_billed, 6, "{end}: none paid twice");
        billed_equals_kept(&s, &f);
    }
}

#[test]
fn an_errored_request_fails_its_row_when_refused_and_stays_pending_when_the_server_failed() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = vec![
        "fine".to_string(),
        "refused FAULT:400".to_string(),
        "flaky FAULT:500:1".to_string(),
    ];
    let j = batch_job(&f, &s, &rows, "");
    ok_run(&f, &["run", &j]);
    s.complete_batches();
    assert_eq!(run(&f, &["batch", "collect", &j]).code, 1, "a row failed");
    let recs = f.records();
    let by = |t: &str| -> Vec<&Value> { recs.iter().filter(|r| r["input"]["text"] == t).collect() };
    assert_eq!(by("fine")[0]["status"], "ok");
    let refused = by("refused FAULT:400");
    assert_eq!(refused[0]["status"], "error");
    assert!(
        refused[0]["error"]
            .to_string()
            .contains("invalid_request_error"),
        "{}",
        refused[0]
    );
    assert!(
        by("flaky FAULT:500:1").is_empty(),
        "a server error is not billed: pending"
    );
    assert_eq!(f.summary()["rows_pending"], 1);
    // The next run sends the pending row again, and only it; the refused row waits for
    // --retry-failed (and keeps the exit code at 1: some rows failed).
    assert_eq!(run(&f, &["run", &j]).code, 1);
    s.complete_batches();
    assert_eq!(run(&f, &["batch", "collect", &j]).code, 1);
    assert_eq!(s.message_batch_requests().len(), 4);
    assert_eq!(by_status(&f, "ok"), 2);
    billed_equals_kept(&s, &f);
}

fn by_status(f: &Fixture, status: &str) -> usize {
    f.records().iter().filter(|r| r["status"] == status).count()
}

/// The budget is checked before a Message Batch is submitted, at the worst case of every
/// request submitted and not collected (Claude's batch prices, its estimate's margin): rows past
/// it are not submitted, a rerun while the batch runs submits nothing, and what is kept never
/// passes the cap.
#[test]
fn the_budget_holds_before_a_message_batch_is_submitted_and_across_runs() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(12, "item");
    // A row's worst case at batch prices is about $0.0032 (1,100+ prompt tokens at $1.50,
    // 200 out at $7.50): $0.01 fits three.
    let j = batch_job(&f, &s, &rows, "");
    let text = std::fs::read_to_string(&j).unwrap();
    std::fs::write(&j, text.replace("[run]\n", "[run]\nmax_cost_usd = 0.01\n")).unwrap();
    let r = run(&f, &["run", &j]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("budget"), "{}", r.stderr);
    let submitted = s.message_batch_requests().len();
    assert!((1..12).contains(&submitted), "{submitted}");
    let r = run(&f, &["run", &j]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(s.stats().batches_created, 1, "no room while the batch runs");
    s.complete_batches();
    let _ = run(&f, &["batch", "collect", &j]);
    let spent: f64 = f
        .records()
        .iter()
        .map(|r| r["cost_usd"].as_f64().unwrap())
        .sum();
    assert!(spent > 0.0 && spent <= 0.01, "{spent}");
    assert_eq!(f.records().len(), submitted);
    billed_equals_kept(&s, &f);
}

/// A `results_url` on another host is not fetched: the key would go with the request. The
/// collect fails saying so, the other host sees no connection, and the rows stay pending.
#[test]
fn results_on_another_host_are_refused_and_the_key_never_goes_there() {
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    elsewhere.set_nonblocking(true).unwrap();
    let s = spawn_background(Config {
        message_results_root: Some(format!("http://{}", elsewhere.local_addr().unwrap())),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(2, "item");
    let j = batch_job(&f, &s, &rows, "");
    ok_run(&f, &["run", &j]);
    s.complete_batches();
    let r = run(&f, &["batch", "collect", &j]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("another host"), "{}", r.stderr);
    assert!(!r.stderr.contains(KEY));
    assert!(
        matches!(elsewhere.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing connected to the other host"
    );
    assert!(read_jsonl_if_there(&f.path("out/result.jsonl")).is_empty());
}

/// Reads that fail (a retrieve, the results) are retried like any call that is safe to
/// repeat: the batch is followed and collected, nothing is created twice.
#[test]
fn failed_reads_of_a_message_batch_are_retried_and_nothing_is_created_twice() {
    let s = spawn_background(Config {
        batch_auto_advance: true,
        batch_read_failures: 3,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(5, "item");
    let j = batch_job(&f, &s, &rows, "");
    ok_run(&f, &["run", "--wait", &j]);
    let st = s.stats();
    assert_eq!(st.faults, 3, "three reads failed");
    assert_eq!((st.batches_created, st.batch_requests_billed), (1, 5));
    assert_eq!(answered(&f), all(&rows));
    billed_equals_kept(&s, &f);
}
