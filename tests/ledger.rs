//! The ledger's promise on every failure path, through the real binary against the fake
//! server: every row ends exactly once, nothing finished is lost, nothing is paid for twice,
//! the budget is never passed. Each test counts what the server billed against what the
//! output kept.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// Rewrites one line of a job file the fixture wrote.
fn set(job: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(job).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(job, text.replace(from, to)).unwrap();
}

fn completions(f: &Fixture) -> Vec<String> {
    f.records()
        .iter()
        .map(|r| r["completion"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn inserted_reordered_and_deleted_rows_cost_exactly_what_changed() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let base = texts(300, "product");
    f.write("data.csv", csv_of(&base));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 300);

    // Ten rows inserted at the top and three in the middle: exactly those are sent.
    let mut grown = texts(10, "new top");
    grown.extend(base[..150].iter().cloned());
    grown.extend(texts(3, "new middle"));
    grown.extend(base[150..].iter().cloned());
    f.write("data.csv", csv_of(&grown));
    let r = f.run(&["run", "--quiet", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 313, "only the 13 new rows are sent");
    let recs = f.records();
    assert_eq!(recs.len(), 313);
    for (i, (rec, text)) in recs.iter().zip(&grown).enumerate() {
        assert_eq!(rec["row"], i as u64 + 1, "renumbered in input order");
        assert_eq!(rec["input"]["text"], text.as_str());
        assert_eq!(rec["completion"], format!("echo: {text}"));
    }

    // Reordered: nothing is sent, the output follows the new order.
    let mut shuffled = grown.clone();
    shuffled.reverse();
    f.write("data.csv", csv_of(&shuffled));
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 313);
    let want: Vec<String> = shuffled.iter().map(|t| format!("echo: {t}")).collect();
    assert_eq!(completions(&f), want);

    // Deleted: nothing is sent; the output holds exactly the input's rows and the records
    // of the deleted rows are in the stale file, not gone.
    let kept: Vec<String> = shuffled.iter().step_by(2).cloned().collect();
    f.write("data.csv", csv_of(&kept));
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 313);
    let want: Vec<String> = kept.iter().map(|t| format!("echo: {t}")).collect();
    assert_eq!(completions(&f), want);
    let stale = read_jsonl_if_there(&f.path("out/result.stale.jsonl"));
    assert_eq!(stale.len(), 313 - kept.len());
    let all: BTreeSet<String> = f
        .records()
        .iter()
        .chain(&stale)
        .map(|r| r["input"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(all.len(), 313, "every paid record is kept somewhere");
    assert_eq!(f.summary()["rows_stale"], 313 - kept.len() as u64);
    // The output's spend still counts the stale records: they were paid for.
    let paid: f64 = f
        .records()
        .iter()
        .chain(&stale)
        .map(|r| r["cost_usd"].as_f64().unwrap())
        .sum();
    let spent = f.summary()["spent_usd"].as_f64().unwrap();
    assert!((spent - paid).abs() < 1e-9, "spent {spent}, paid {paid}");

    // The CSV follows the output.
    let csv = std::fs::read_to_string(f.path("out/result.csv")).unwrap();
    assert_eq!(csv.lines().count(), kept.len() + 1);
}

#[test]
fn an_output_from_before_request_keys_is_resumed_without_paying_again() {
    use sha2::Digest;
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(4));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "temperature = 0.5",
        "",
        &s.base_url(),
    );
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    // What the previous release wrote: the fingerprint was the request body's SHA-256.
    let bodies = s.requests();
    let out = f.path("out/result.jsonl");
    let mut old = String::new();
    for mut rec in f.records() {
        let text = rec["input"]["text"].as_str().unwrap().to_string();
        let body = bodies
            .iter()
            .find(|b| b["messages"][1]["content"] == text.as_str())
            .unwrap();
        let digest = sha2::Sha256::digest(serde_json::to_vec(body).unwrap());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        rec["fingerprint"] = Value::String(hex);
        old.push_str(&serde_json::to_string(&rec).unwrap());
        old.push('\n');
    }
    std::fs::write(&out, &old).unwrap();
    let r = f.run(&["run", "--quiet", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 4, "upgrading re-pays nothing");
    let now: Vec<Value> = f.records();
    assert_eq!(now.len(), 4);
    assert!(now.iter().zip(old.lines()).all(|(n, o)| {
        let o: Value = serde_json::from_str(o).unwrap();
        n["fingerprint"] != o["fingerprint"] && n["completion"] == o["completion"]
    }));
    // Records now carry the current fingerprint: a third run is a plain resume.
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 4);
}

#[test]
fn rows_deleted_then_put_back_are_not_paid_for_again() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let all = texts(20, "item");
    f.write("data.csv", csv_of(&all));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    f.write("data.csv", csv_of(&all[..10]));
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    let spent = f.summary()["spent_usd"].as_f64().unwrap();
    f.write("data.csv", csv_of(&all));
    let r = f.run(&["run", "--quiet", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        s.stats().requests,
        20,
        "the restored rows are copied from the stale file"
    );
    let recs = f.records();
    assert_eq!(
        completions(&f),
        all.iter().map(|t| format!("echo: {t}")).collect::<Vec<_>>()
    );
    for rec in &recs[10..] {
        assert_eq!(rec["cost_usd"], 0.0);
        assert!(rec["copied_from"]["row"].as_u64().is_some());
    }
    // The paid answers stay in the stale file and are counted once.
    assert_eq!(read_jsonl(&f.path("out/result.stale.jsonl")).len(), 10);
    let now = f.summary()["spent_usd"].as_f64().unwrap();
    assert!((now - spent).abs() < 1e-12, "{now} vs {spent}");
}

#[test]
fn an_edited_unused_column_updates_the_record_without_a_request() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "text,price\na,1\nb,2\n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    f.write("data.csv", "text,price\na,10\nb,20\n");
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 2);
    let prices: Vec<Value> = f
        .records()
        .iter()
        .map(|r| r["input"]["price"].clone())
        .collect();
    assert_eq!(prices, ["10", "20"]);
}

#[test]
fn identical_requests_are_sent_once_and_the_copy_says_where_it_came_from() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "text\nsame\nother\nsame\nsame\n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 2, "one request per distinct body");
    let recs = f.records();
    assert_eq!(recs.len(), 4);
    assert!(recs[0].get("copied_from").is_none());
    for i in [2, 3] {
        assert_eq!(recs[i]["completion"], "echo: same");
        assert_eq!(recs[i]["copied_from"]["row"], 1);
        assert_eq!(recs[i]["cost_usd"], 0.0, "a copy costs nothing");
        assert_eq!(recs[i]["row"], i as u64 + 1);
    }
    assert_eq!(f.summary()["rows_copied"], 2);
    // The rerun sends nothing and keeps the copies.
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 2);
    assert_eq!(f.records().len(), 4);
    assert_eq!(f.records()[3]["copied_from"]["row"], 1);
}

#[test]
fn with_an_id_column_a_row_is_known_by_its_id_and_its_request() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "sku,text\nA,x\nB,y\n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("[input]\n", "[input]\nid = \"sku\"\n");
    std::fs::write(&job, text).unwrap();
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    // A new id with a request already answered: copied, not sent; a moved row: kept.
    f.write("data.csv", "sku,text\nC,x\nB,y\nA,x\n");
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    assert_eq!(s.stats().requests, 2);
    let recs = f.records();
    let ids: Vec<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["C", "B", "A"]);
    assert_eq!(recs[0]["copied_from"]["id"], "A");
    assert!(recs[2].get("copied_from").is_none());
}

#[test]
fn a_journal_rewritten_by_another_tool_resumes_and_compacts_without_loss() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(100));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    // What Python's json.dumps would write after a round trip with sorted keys: spaces after
    // separators, another key order, CRLF line ends, blank lines, and one line that is not a
    // record at all (line 52).
    let out = f.path("out/result.jsonl");
    let mut text = String::new();
    for (i, line) in std::fs::read_to_string(&out).unwrap().lines().enumerate() {
        let v: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        let sorted: std::collections::BTreeMap<_, _> = v.into_iter().collect();
        let spaced = serde_json::to_string(&sorted)
            .unwrap()
            .replace("\":", "\": ")
            .replace(",\"", ", \"");
        text.push_str(&spaced);
        text.push_str("\r\n");
        if i == 49 {
            text.push_str("\r\nnot a record\r\n");
        }
    }
    std::fs::write(&out, text).unwrap();
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 100, "nothing is sent again");
    assert!(r.stderr.contains("line 52"), "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 100, "compaction keeps every record");
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["row"], i as u64 + 1);
        assert_eq!(rec["completion"], format!("echo: row {}", i + 1));
    }
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(!written.contains('\r') && written.starts_with("{\"row\":1,"));
    assert_eq!(
        std::fs::read_to_string(f.path("out/result.rejected.txt")).unwrap(),
        "not a record\r\n",
        "the foreign line is kept aside"
    );
}

#[test]
fn a_huge_row_number_in_a_record_is_harmless() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    let out = f.path("out/result.jsonl");
    let mut text = std::fs::read_to_string(&out).unwrap();
    text = text.replacen("{\"row\":2,", "{\"row\":400000000000,", 1);
    std::fs::write(&out, &text).unwrap();
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The record is still keyed by its request: nothing to send, row 2 renumbered.
    assert_eq!(s.stats().requests, 3);
    let rows: Vec<u64> = f
        .records()
        .iter()
        .map(|r| r["row"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, [1, 2, 3]);
}

#[test]
fn a_full_disk_stops_the_spending_and_the_rerun_repays_at_most_what_was_in_flight() {
    let s = spawn_background(Config {
        latency_ms: 5,
        ..Default::default()
    });
    let f = Fixture::new();
    let rows = 1500;
    f.write("data.csv", csv_rows(rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    // A loaded test machine must not turn slow answers into retries (each a second bill).
    set(&job, "timeout_s = 5", "timeout_s = 60");
    let job = job.to_str().unwrap();
    // A 96 KiB file-size limit stands in for a full disk: writes past it fail with EFBIG.
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 96; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_promptmill"))
        .args(["run", "--quiet", job, "--concurrency", "16"])
        .current_dir(f.dir.path())
        .env("OPENAI_API_KEY", KEY)
        .output()
        .unwrap();
    let r = ran(o);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("result.jsonl"),
        "names the path: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("os error"),
        "names the OS error: {}",
        r.stderr
    );
    let kept = read_jsonl(&f.path("out/result.jsonl")).len() as u64;
    let billed = s.stats().ok;
    let retries = f.summary()["retries"].as_u64().unwrap();
    assert!(kept > 0 && kept < rows as u64, "kept {kept}");
    // A row keeps its concurrency slot until its record is on disk: at most 16 answered rows
    // can be lost (plus any retry, each a second bill).
    assert!(
        billed <= kept + 16 + retries,
        "billed {billed} but kept {kept} ({retries} retries): only requests in flight may be lost"
    );
    // Space is back: the rerun completes, no row lost, re-paying at most what was in flight.
    let r = f.run(&["run", "--quiet", job, "--concurrency", "16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), rows);
    let billed = s.stats().ok;
    assert!(
        billed <= rows as u64 + 16,
        "billed {billed} for {rows} rows"
    );
}

fn term(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn sigterm_finishes_the_requests_in_flight_writes_them_and_exits_143() {
    let s = spawn_background(Config {
        latency_ms: 700,
        ..Default::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(40));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    let child = f
        .cmd(&["run", job])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&f.path("out/result.jsonl"), 4, Duration::from_secs(20));
    term(&child);
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 143, "{}", r.stderr);
    assert!(
        r.stderr.contains("rows ok"),
        "the summary is printed: {}",
        r.stderr
    );
    assert!(r.stderr.contains("SIGTERM"), "{}", r.stderr);
    let kept = f.records().len() as u64;
    assert_eq!(
        s.stats().ok,
        kept,
        "every answer the server gave is written"
    );
    assert!(kept < 40);
    assert_eq!(
        f.summary()["stopped"]
            .as_str()
            .map(|m| m.contains("SIGTERM")),
        Some(true)
    );
    let r = f.run(&["run", "--quiet", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 40);
    assert_eq!(s.stats().ok, 40, "nothing paid twice");
}

#[test]
fn a_second_sigterm_cancels_the_requests_in_flight_and_keeps_what_arrived() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    // Rows 1-6 answer at once; the rest hang until the client gives up.
    let mut data = String::from("text\n");
    for i in 1..=30 {
        if i <= 6 {
            data.push_str(&format!("row {i}\n"));
        } else {
            data.push_str(&format!("row {i} FAULT:slow=20000\n"));
        }
    }
    f.write("data.csv", data);
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    set(&job, "timeout_s = 5", "timeout_s = 60");
    let job = job.to_str().unwrap();
    let started = Instant::now();
    let child = f
        .cmd(&["run", job])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&f.path("out/result.jsonl"), 6, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    term(&child);
    std::thread::sleep(Duration::from_millis(300));
    term(&child);
    let r = ran(child.wait_with_output().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "did not wait for the slow rows"
    );
    assert_eq!(r.code, 143, "{}", r.stderr);
    assert!(r.stderr.contains("rows ok"), "{}", r.stderr);
    let recs = f.records();
    assert_eq!(
        recs.len(),
        6,
        "every record received before the cancel is written"
    );
    assert!(recs.iter().all(|r| r["status"] == "ok"));
    assert_eq!(s.stats().ok, 6, "every answer the server gave is kept");
    // The cancelled requests may have been billed: counted at their worst case.
    assert!(f.summary()["unconfirmed_usd"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_grace_period_ends_with_the_requests_in_flight_cancelled() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "text\nfast\nslow FAULT:slow=20000\n");
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "",
        "shutdown_grace_s = 1",
        &s.base_url(),
    );
    set(&job, "timeout_s = 5", "timeout_s = 60");
    let started = Instant::now();
    let child = f
        .cmd(&["run", job.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&f.path("out/result.jsonl"), 1, Duration::from_secs(20));
    term(&child);
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 143, "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(f.records().len(), 1);
    assert_eq!(s.stats().ok, 1, "every answer the server gave is kept");
}

#[test]
fn the_budget_caps_the_outputs_spend_across_runs() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(40));
    // gpt-4o-mini, 20 max tokens: each request's bound is about $0.00002.
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "",
        "max_cost_usd = 0.0001",
        &s.base_url(),
    );
    set(&job, "concurrency = 4", "concurrency = 1");
    let job = job.to_str().unwrap();
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let first = s.stats().requests;
    assert!(first > 0 && first < 40);
    let spent = f.summary()["spent_usd"].as_f64().unwrap();
    // What the server billed, at gpt-4o-mini's prices, is within the budget, and is what
    // the output says it spent.
    let st = s.stats();
    let billed_usd =
        (st.billed_prompt_tokens as f64 * 0.15 + st.billed_completion_tokens as f64 * 0.60) / 1e6;
    assert!(
        billed_usd > 0.0 && billed_usd <= 0.0001,
        "billed {billed_usd}"
    );
    assert!(
        (billed_usd - spent).abs() < 1e-12,
        "billed {billed_usd}, spent {spent}"
    );
    assert!(r.stderr.contains("spent / budget"), "{}", r.stderr);
    // The same command again: the cap is the output's, so nothing more is spent.
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(
        s.stats().requests,
        first,
        "a rerun does not spend a second budget"
    );
    // A raised cap goes on.
    let r = f.run(&["run", job, "--max-cost", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 40);
    assert_eq!(s.stats().requests, 40);
    let st = s.stats();
    let billed_usd =
        (st.billed_prompt_tokens as f64 * 0.15 + st.billed_completion_tokens as f64 * 0.60) / 1e6;
    let spent = f.summary()["spent_usd"].as_f64().unwrap();
    assert!(
        (billed_usd - spent).abs() < 1e-12,
        "billed {billed_usd}, spent {spent}"
    );
}

#[test]
fn a_budget_without_a_completion_cap_is_refused() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "",
        "max_cost_usd = 1",
        &s.base_url(),
    );
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_tokens = 20\n", "");
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("max_cost_usd") && r.stderr.contains("max_tokens"),
        "{}",
        r.stderr
    );
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn an_attempt_that_timed_out_counts_against_the_budget_at_its_worst_case() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", "text\nFAULT:hang:1 a\nb\n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    set(&job, "timeout_s = 5", "timeout_s = 1");
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    let unconfirmed = recs[0]["unconfirmed_usd"].as_f64().unwrap();
    assert!(unconfirmed > 0.0);
    assert!(recs[1].get("unconfirmed_usd").is_none());
    let sum = f.summary();
    assert!((sum["unconfirmed_usd"].as_f64().unwrap() - unconfirmed).abs() < 1e-12);
    assert!(r.stderr.contains("unconfirmed spend"), "{}", r.stderr);
}

#[test]
fn a_server_without_usage_gets_estimated_priced_usage_and_one_warning() {
    for stream in [false, true] {
        let s = spawn_background(Config {
            omit_usage: true,
            ..Default::default()
        });
        let f = Fixture::new();
        f.write("data.csv", csv_rows(5));
        let job = f.job(
            "data.csv",
            "{{ text }}",
            &format!("stream = {stream}"),
            "",
            &s.base_url(),
        );
        let r = f.run(&["run", job.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(
            r.stderr.matches("sent no `usage`").count(),
            1,
            "{}",
            r.stderr
        );
        for rec in f.records() {
            let u = &rec["usage"];
            assert_eq!(u["estimated"], true, "stream={stream}");
            assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
            assert!(u["completion_tokens"].as_u64().unwrap() > 0);
            assert!(rec["cost_usd"].as_f64().unwrap() > 0.0, "never a silent 0");
        }
        assert_eq!(f.summary()["estimated_usage_rows"], 5);
    }
}

#[test]
fn an_unreachable_endpoint_stops_the_job_and_leaves_the_rows_pending() {
    // A port nothing listens on: bind, note it, let it go.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(50));
    let base = format!("http://{addr}/v1");
    let job = f.job("data.csv", "{{ text }}", "", "outage_s = 2", &base);
    let job = job.to_str().unwrap();
    let started = Instant::now();
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(r.stderr.contains("cannot be reached"), "{}", r.stderr);
    assert!(
        f.records().is_empty(),
        "an outage is not a verdict on the rows"
    );
    // The endpoint is back: a plain rerun does every row.
    let s = spawn_background_on(Config::default(), addr).unwrap();
    let r = f.run(&["run", "--quiet", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 50);
    assert_eq!(s.stats().requests, 50);
}

#[test]
fn a_server_failing_every_request_stops_the_job_instead_of_failing_the_rows() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let mut data = String::from("text\n");
    for i in 1..=30 {
        data.push_str(&format!("row {i} FAULT:503\n"));
    }
    f.write("data.csv", data);
    let job = f.job("data.csv", "{{ text }}", "", "outage_s = 2", &s.base_url());
    set(&job, "max_retries = 4", "max_retries = 20");
    let started = Instant::now();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        r.stderr.contains("every request has failed"),
        "{}",
        r.stderr
    );
    assert!(
        f.records().is_empty(),
        "no row is marked failed by an outage"
    );
}

#[test]
fn another_endpoint_is_another_request() {
    let a = spawn_background(Config::default());
    let b = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = f.job("data.csv", "{{ text }}", "", "", &a.base_url());
    assert_eq!(f.run(&["run", "--quiet", job.to_str().unwrap()]).code, 0);
    set(&job, &a.base_url(), &b.base_url());
    assert_eq!(f.run(&["run", "--quiet", job.to_str().unwrap()]).code, 0);
    assert_eq!(
        b.stats().requests,
        5,
        "who answers is part of the fingerprint"
    );
    assert_eq!(f.records().len(), 5);
}

#[test]
fn transient_failures_are_sent_again_by_a_plain_rerun_and_verdicts_wait_for_retry_failed() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    // The ok row answers about 100 ms in: after the flaky row began, and before its retry
    // (backoff of 250 ms at least) fails again. A success while it was failing, so its failures
    // are the row's, not an outage's (which would make it wait for a verdict).
    f.write(
        "data.csv",
        "text\nok FAULT:slow=100\nFAULT:500:2 flaky\nFAULT:400 bad\n",
    );
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    set(&job, "max_retries = 4", "max_retries = 1");
    let job = job.to_str().unwrap();
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(f.summary()["rows_failed_transient"], 1);
    assert!(r.stderr.contains("1 transient"), "{}", r.stderr);
    // Plain rerun: the 500 row is sent again (and now succeeds), the 400 row is not.
    let before = s.stats().requests;
    let r = f.run(&["run", job]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(s.stats().requests, before + 1);
    assert_eq!(f.records()[1]["status"], "ok");
    assert_eq!(f.records()[2]["error"]["kind"], "bad_request");
    let r = f.run(&["run", job, "--retry-failed"]);
    assert_eq!(r.code, 1);
    assert_eq!(s.stats().requests, before + 2);
}

#[test]
fn fresh_checks_first_and_keeps_the_previous_output() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job]).code, 0);
    let paid = std::fs::read_to_string(f.path("out/result.jsonl")).unwrap();
    // A mistyped --input: nothing is touched.
    let r = f.run(&["run", job, "--fresh", "--input", "typo.csv"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("typo.csv"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(f.path("out/result.jsonl")).unwrap(),
        paid
    );
    // A real --fresh starts over and keeps the old output as OUTPUT.prev.jsonl.
    assert_eq!(f.run(&["run", "--quiet", job, "--fresh"]).code, 0);
    assert_eq!(s.stats().requests, 10);
    assert_eq!(
        std::fs::read_to_string(f.path("out/result.prev.jsonl")).unwrap(),
        paid
    );
}

#[test]
fn the_dry_run_sends_exactly_what_the_run_sends() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(20));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", job, "--limit", "8"]).code, 0);
    // New rows, duplicates of done rows and of each other, and a bad row.
    let mut data = csv_rows(20);
    data.push_str("r21,row 3\nr22,fresh\nr23,fresh\n");
    f.write("data.csv", data);
    let r = f.run(&["estimate", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let to_send: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("rows to send"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let before = s.stats().requests;
    f.run(&["run", "--quiet", job]);
    assert_eq!(s.stats().requests - before, to_send, "{}", r.stdout);
    assert_eq!(to_send, 13);
}

#[test]
fn toggling_stream_or_reordering_extra_sends_nothing() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(6));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "extra = { logit_bias = { \"1\" = 1, \"2\" = 2 }, logprobs = false }",
        "",
        &s.base_url(),
    );
    let jobp = job.to_str().unwrap();
    assert_eq!(f.run(&["run", "--quiet", jobp]).code, 0);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "extra = { logit_bias = { \"1\" = 1, \"2\" = 2 }, logprobs = false }",
        "stream = true\nextra = { logprobs = false, logit_bias = { \"2\" = 2, \"1\" = 1 } }",
    );
    std::fs::write(&job, text).unwrap();
    assert_eq!(f.run(&["run", "--quiet", jobp]).code, 0);
    assert_eq!(s.stats().requests, 6);
}

#[test]
fn extra_cannot_override_what_the_job_sets() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    for key in ["stream", "max_tokens", "n", "temperature"] {
        let job = f.job(
            "data.csv",
            "{{ text }}",
            &format!("extra = {{ {key} = 1 }}"),
            "",
            &s.base_url(),
        );
        for cmd in ["run", "validate"] {
            let r = f.run(&[cmd, job.to_str().unwrap()]);
            assert_eq!(r.code, 2, "{cmd} {key}");
            assert!(
                r.stderr.contains(&format!("model.extra.{key}")),
                "{}",
                r.stderr
            );
        }
    }
    assert_eq!(s.stats().requests, 0);
}
