//! Batch mode through the real binary against the fake server's Files and Batches endpoints,
//! on a clock the test moves: every step of a batch, a kill between each pair of steps, reruns
//! while batches run, splitting, expiry, cancellation, failed lines, the batch price and the
//! budget. Each test counts what the server billed against what the output kept.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::util::*;

/// A batch-mode job over `rows`; `batch` goes into a `[batch]` table.
fn batch_job(f: &Fixture, s: &FakeServer, rows: &[String], batch: &str, run: &str) -> String {
    f.write("data.csv", csv_of(rows));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        "",
        &format!("mode = \"batch\"\n{run}"),
        &s.base_url(),
    );
    let mut text = std::fs::read_to_string(&job).unwrap();
    text.push_str(&format!("\n[batch]\npoll_s = 0.05\n{batch}\n"));
    std::fs::write(&job, text).unwrap();
    job.to_str().unwrap().to_string()
}

/// Usage summed over the output's records (and the stale file's).
fn kept_tokens(f: &Fixture) -> (u64, u64) {
    let stale = read_jsonl_if_there(&f.path("out/result.stale.jsonl"));
    f.records()
        .iter()
        .chain(&stale)
        .filter(|r| r["status"] == "ok")
        .fold((0, 0), |(p, c), r| {
            (
                p + r["usage"]["prompt_tokens"].as_u64().unwrap(),
                c + r["usage"]["completion_tokens"].as_u64().unwrap(),
            )
        })
}

/// What the server billed equals what the output kept: nothing paid is lost, nothing twice.
fn billed_equals_kept(s: &FakeServer, f: &Fixture) {
    let st = s.stats();
    assert_eq!(
        (st.billed_prompt_tokens, st.billed_completion_tokens),
        kept_tokens(f),
        "billed vs kept"
    );
}

fn ok_completions(f: &Fixture) -> BTreeSet<String> {
    f.records()
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| r["completion"].as_str().unwrap().to_string())
        .collect()
}

fn echo_all(rows: &[String]) -> BTreeSet<String> {
    rows.iter().map(|t| format!("echo: {t}")).collect()
}

#[test]
fn a_full_round_trip_submits_once_collects_every_row_at_the_batch_price() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(25, "item");
    let job = batch_job(&f, &s, &rows, "", "");

    let r = f.run(&["run", &job]);
    ok(&r);
    assert!(r.stderr.contains("batch status"), "{}", r.stderr);
    assert!(r.stderr.contains("batch collect"), "{}", r.stderr);
    let st = s.stats();
    assert_eq!(st.requests, 0, "nothing is sent online");
    assert_eq!((st.files_uploaded, st.batches_created), (1, 1));
    assert!(f.records().is_empty());
    let sum = f.summary();
    assert_eq!(sum["batch"]["requests_submitted"], 25);
    assert_eq!(sum["batch"]["batches_submitted"], 1);
    assert_eq!(
        sum["rows_pending"], 0,
        "rows in a batch are not pending on a rerun"
    );
    let batches = s.batches();
    assert_eq!(batches[0]["metadata"]["promptmill_job"], "job.toml");
    assert_eq!(batches[0]["completion_window"], "24h");

    // The lines uploaded are the online requests, one per row, each with a custom_id.
    let input = batches[0]["input_file_id"].as_str().unwrap();
    let content = String::from_utf8(s.file_content(input).unwrap()).unwrap();
    let lines: Vec<Value> = content
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 25);
    for l in &lines {
        assert_eq!(l["method"], "POST");
        assert_eq!(l["url"], "/v1/chat/completions");
        assert_eq!(l["body"]["model"], "gpt-4o-mini");
        assert!(l["body"].get("stream").is_none());
    }
    let ids: BTreeSet<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 25, "custom_ids are unique");

    // Still running: status shows it; a rerun submits nothing and reports it.
    s.advance_batches();
    let st_out = f.run(&["batch", "status", &job]);
    ok(&st_out);
    assert!(st_out.stdout.contains("in_progress"), "{}", st_out.stdout);
    assert!(st_out.stdout.contains("left"), "{}", st_out.stdout);
    let r = f.run(&["run", &job]);
    ok(&r);
    assert_eq!(
        s.stats().batches_created,
        1,
        "a rerun while in flight submits nothing"
    );
    assert_eq!(f.summary()["batch"]["requests_in_flight"], 25);

    s.complete_batches();
    let r = f.run(&["batch", "collect", &job]);
    ok(&r);
    let recs = f.records();
    assert_eq!(recs.len(), 25);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    let batch_id = batches[0]["id"].as_str().unwrap();
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["row"], i as u64 + 1, "input order");
        assert_eq!(rec["mode"], "batch");
        assert_eq!(rec["batch_id"], batch_id);
        // gpt-4o-mini at batch rates: $0.075 / $0.30 per 1M tokens, half the online price.
        let p = rec["usage"]["prompt_tokens"].as_f64().unwrap();
        let c = rec["usage"]["completion_tokens"].as_f64().unwrap();
        let want = (p * 0.075 + c * 0.30) / 1e6;
        let cost = rec["cost_usd"].as_f64().unwrap();
        assert!((cost - want).abs() < 1e-12, "{cost} != {want}");
    }
    let csv = std::fs::read_to_string(f.path("out/result.csv")).unwrap();
    assert_eq!(csv.lines().count(), 26);
    billed_equals_kept(&s, &f);

    // Done: another run sends and submits nothing, and the status says so.
    ok(&f.run(&["run", &job]));
    assert_eq!(s.stats().batches_created, 1);
    assert_eq!(s.stats().requests, 0);
    assert_eq!(f.records().len(), 25);
    let st_out = f.run(&["batch", "status", &job]);
    assert!(
        st_out.stdout.contains("no batches in flight"),
        "{}",
        st_out.stdout
    );
}

/// Every step, and a kill right after it is on record: the next command picks up from the
/// record, submits nothing twice and loses nothing.
#[test]
fn a_kill_between_any_two_steps_loses_nothing_and_submits_nothing_twice() {
    for step in BATCH_STEPS {
        let s = spawn_background(Config::default());
        let f = Fixture::new();
        let rows = texts(12, "item");
        let job = batch_job(&f, &s, &rows, "max_requests_per_file = 5", "");
        batch_killed_at(&f, &s, &job, step, &[]);
        let st = s.stats();
        let strays = std::fs::read_dir(f.path("out/result.jsonl.batches.d"))
            .unwrap()
            .filter(|e| {
                let n = e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                n.starts_with('p') && n.ends_with(".jsonl")
            })
            .count();
        assert_eq!(strays, 3, "{step}: only the submitted files are kept");
        assert_eq!(
            st.batches_created, 3,
            "{step}: 12 rows in files of 5, each once"
        );
        assert_eq!(
            st.batch_requests_billed, 12,
            "{step}: every row billed once"
        );
        assert_eq!(ok_completions(&f), echo_all(&rows), "{step}");
        assert_eq!(f.records().len(), 12, "{step}");
        billed_equals_kept(&s, &f);
    }
}

#[test]
fn rows_are_split_within_the_configured_request_and_byte_limits() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(10, "item");
    let job = batch_job(&f, &s, &rows, "max_requests_per_file = 3", "");
    let dry = f.run(&["run", "--dry-run", &job]);
    ok(&dry);
    assert!(dry.stdout.contains("batch files       4"), "{}", dry.stdout);
    assert!(dry.stdout.contains("batch prices"), "{}", dry.stdout);
    assert_eq!(s.stats().files_uploaded, 0, "a dry run uploads nothing");
    // At batch prices: half the online bound for the same rows.
    let bound = |out: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with("cost bound")).unwrap();
        line.split('$')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let online = f.run(&["run", "--dry-run", "--mode", "online", &job]);
    let ratio = bound(&dry.stdout) / bound(&online.stdout);
    // (printed to six decimals, so within rounding)
    assert!((ratio - 0.5).abs() < 0.01, "{ratio}");
    ok(&f.run(&["run", &job]));
    let sizes: Vec<usize> = s
        .batches()
        .iter()
        .map(|b| {
            let id = b["input_file_id"].as_str().unwrap();
            String::from_utf8(s.file_content(id).unwrap())
                .unwrap()
                .lines()
                .count()
        })
        .collect();
    let mut sorted = sizes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 3, 3, 3]);

    // By bytes: every file within the limit, every row in exactly one file.
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let job = batch_job(&f, &s, &rows, "max_bytes_per_file = 1100", "");
    ok(&f.run(&["run", &job]));
    let mut all = Vec::new();
    for b in s.batches() {
        let id = b["input_file_id"].as_str().unwrap();
        let content = s.file_content(id).unwrap();
        assert!(content.len() <= 1100, "{} bytes", content.len());
        all.extend(
            String::from_utf8(content)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].clone()),
        );
    }
    assert!(s.batches().len() > 1);
    assert_eq!(all.len(), 10);
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(ok_completions(&f), echo_all(&rows));
}

#[test]
fn an_expired_batch_keeps_what_it_finished_and_a_rerun_submits_only_the_rest() {
    let s = spawn_background(Config {
        batch_lines_per_step: Some(4),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(10, "item");
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    s.advance_batches(); // validating → in_progress
    s.advance_batches(); // 4 lines run
    s.expire_batches();
    let r = f.run(&["batch", "collect", &job]);
    ok(&r);
    let done: Vec<Value> = f.records();
    assert_eq!(
        done.len(),
        4,
        "the finished results are kept: they are billed"
    );
    assert_eq!(f.summary()["rows_pending"], 6);

    // A plain rerun submits the six that got no answer, and only them.
    ok(&f.run(&["run", &job]));
    assert_eq!(s.stats().batches_created, 2);
    let second = &s.batches()[0];
    let second = if second["status"] == "expired" {
        s.batches()[1].clone()
    } else {
        second.clone()
    };
    let id = second["input_file_id"].as_str().unwrap();
    assert_eq!(
        String::from_utf8(s.file_content(id).unwrap())
            .unwrap()
            .lines()
            .count(),
        6
    );
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(ok_completions(&f), echo_all(&rows));
    assert_eq!(s.stats().batch_requests_billed, 10, "no row paid twice");
    billed_equals_kept(&s, &f);
}

#[test]
fn a_cancelled_batch_keeps_its_finished_rows_and_the_rest_stay_pending() {
    let s = spawn_background(Config {
        batch_lines_per_step: Some(3),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(9, "item");
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    s.advance_batches();
    s.advance_batches();
    let r = f.run(&["batch", "cancel", &job]);
    ok(&r);
    assert!(r.stdout.contains("cancelling"), "{}", r.stdout);
    s.advance_batches(); // cancelling → cancelled
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(f.records().len(), 3);
    assert_eq!(s.stats().batches_cancelled, 1);
    billed_equals_kept(&s, &f);
    // The rest go in the next submission.
    ok(&f.run(&["run", &job]));
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(ok_completions(&f), echo_all(&rows));
    billed_equals_kept(&s, &f);
}

#[test]
fn error_lines_fail_their_rows_until_retry_failed_which_can_send_them_online() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let mut rows = texts(6, "item");
    rows[2] = "bad FAULT:400".into();
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    s.complete_batches();
    let r = f.run(&["batch", "collect", &job]);
    assert_eq!(r.code, 1, "a failed row: exit 1\n{}", r.stderr);
    let recs = f.records();
    let bad = &recs[2];
    assert_eq!(bad["status"], "error");
    assert_eq!(bad["error"]["kind"], "batch_line");
    assert_eq!(bad["error"]["status"], 400);
    assert!(!bad["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(bad["mode"], "batch");

    // A plain rerun leaves it; --retry-failed sends it again, here online.
    ok_or_1(&f.run(&["run", &job]));
    assert_eq!(s.stats().batches_created, 1);
    let r = f.run(&["run", "--retry-failed", "--mode", "online", &job]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(s.stats().requests, 1, "the failed row, online");
    assert_eq!(s.stats().batches_created, 1);
}

fn ok_or_1(r: &Ran) {
    assert!(r.code == 0 || r.code == 1, "{}\n{}", r.code, r.stderr);
}

#[test]
fn a_batch_whose_every_line_failed_has_no_output_file_and_fails_every_row() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows: Vec<String> = (1..=4).map(|i| format!("bad {i} FAULT:400")).collect();
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    s.complete_batches();
    assert!(s.batches()[0]["output_file_id"].is_null());
    let r = f.run(&["batch", "collect", &job]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 4);
    assert!(recs.iter().all(|r| r["error"]["kind"] == "batch_line"));
    // Failed retried as a new batch.
    ok(&f.run(&["run", "--retry-failed", &job]));
    assert_eq!(s.stats().batches_created, 2);
}

#[test]
fn a_batch_that_fails_validation_shows_the_apis_errors_with_line_numbers() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let mut rows = texts(5, "item");
    rows[3] = "poison FAULT:batchinvalid".into();
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    s.complete_batches();
    assert_eq!(s.batches()[0]["status"], "failed");
    let r = f.run(&["batch", "collect", &job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("line 4"), "{}", r.stderr);
    let recs = f.records();
    let bad: Vec<&Value> = recs.iter().filter(|r| r["status"] == "error").collect();
    assert_eq!(bad.len(), 1, "the line it names fails");
    assert_eq!(bad[0]["input"]["text"], "poison FAULT:batchinvalid");
    assert_eq!(
        s.stats().batch_requests_billed,
        0,
        "a failed batch bills nothing"
    );
    // The others are submitted again by a plain run (exit 1: a failed row is in the output).
    ok_or_1(&f.run(&["run", &job]));
    s.complete_batches();
    ok_or_1(&f.run(&["batch", "collect", &job]));
    assert_eq!(ok_completions(&f).len(), 4);
    billed_equals_kept(&s, &f);
}

#[test]
fn the_budget_is_checked_before_submitting_at_the_worst_case_of_everything_submitted() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(40, "item");
    // Each row's worst case at batch prices is about 26 prompt tokens and 20 output tokens:
    // about $0.0000080; a budget of $0.0001 fits some rows, not all 40.
    let job = batch_job(&f, &s, &rows, "", "max_cost_usd = 0.0001");
    let r = f.run(&["run", &job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("budget"), "{}", r.stderr);
    let submitted = f.summary()["batch"]["requests_submitted"].as_u64().unwrap();
    assert!(submitted > 0 && submitted < 40, "{submitted}");
    // While they run, the rerun has no room: the batch's worst case holds the budget.
    let r = f.run(&["run", &job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(s.stats().batches_created, 1);
    s.complete_batches();
    let r = f.run(&["batch", "collect", &job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let spent: f64 = f
        .records()
        .iter()
        .map(|r| r["cost_usd"].as_f64().unwrap())
        .sum();
    assert!(spent <= 0.0001);
    billed_equals_kept(&s, &f);
}

#[test]
fn run_wait_submits_polls_and_collects_in_one_command() {
    let s = spawn_background(Config {
        batch_auto_advance: true,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(8, "item");
    let job = batch_job(&f, &s, &rows, "max_requests_per_file = 5", "");
    let r = f.run(&["run", "--wait", &job]);
    ok(&r);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    assert_eq!(s.stats().batches_created, 2);
    billed_equals_kept(&s, &f);
}

#[test]
fn run_wait_on_stdin_reads_it_once_and_every_pass_sees_its_rows() {
    use std::io::Write;
    let s = spawn_background(Config {
        batch_auto_advance: true,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(12, "item");
    let job = batch_job(&f, &s, &rows, "max_requests_per_file = 5", "");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "path = \"data.csv\"",
        "path = \"data.csv\"\nformat = \"csv\"",
    );
    std::fs::write(&job, text).unwrap();
    let mut child = f
        .cmd(&["run", "--wait", "--input", "-", &job])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(csv_of(&rows).as_bytes())
        .unwrap();
    let r = ran(child.wait_with_output().unwrap());
    ok(&r);
    // Every pass after the first read the kept copy, not an empty stdin: all rows collected,
    // none moved to the stale file, and the copy gone once the passes end.
    assert_eq!(ok_completions(&f), echo_all(&rows));
    // Matched to their rows, not written as answers no row asked for: each keeps its input.
    let inputs: std::collections::BTreeSet<String> = f
        .records()
        .iter()
        .filter_map(|r| r["input"]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(inputs, rows.iter().cloned().collect());
    assert!(!f.path("out/result.stale.jsonl").exists());
    assert!(!f.path("out/result.jsonl.input.csv").exists());
    billed_equals_kept(&s, &f);
}

#[test]
fn an_online_run_never_sends_rows_a_running_batch_holds() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(5, "item");
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    // More rows arrive; the online run sends only those.
    let mut more = rows.clone();
    more.extend(["late 1".to_string(), "late 2".to_string()]);
    f.write("data.csv", csv_of(&more));
    ok(&f.run(&["run", "--mode", "online", &job]));
    assert_eq!(s.stats().requests, 2);
    // --fresh would lose what the batch is running: refused.
    let r = f.run(&["run", "--fresh", &job]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("batch"), "{}", r.stderr);
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(ok_completions(&f), echo_all(&more));
    billed_equals_kept(&s, &f);
    // Answers for rows that left the input are kept in the stale file.
}

#[test]
fn results_for_rows_that_left_the_input_are_kept_in_the_stale_file() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(6, "item");
    let job = batch_job(&f, &s, &rows, "", "");
    ok(&f.run(&["run", &job]));
    f.write("data.csv", csv_of(&rows[..4]));
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(f.records().len(), 4);
    let stale = read_jsonl_if_there(&f.path("out/result.stale.jsonl"));
    assert_eq!(stale.len(), 2);
    billed_equals_kept(&s, &f);
    // Put back: copied from the stale file, not submitted again.
    f.write("data.csv", csv_of(&rows));
    ok(&f.run(&["run", &job]));
    assert_eq!(s.stats().batches_created, 1);
    assert_eq!(ok_completions(&f), echo_all(&rows));
}

#[test]
fn the_key_never_reaches_the_batch_files_or_log() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Config::default()
    });
    let f = Fixture::new();
    let job = batch_job(&f, &s, &texts(3, "item"), "", "");
    ok(&f.run(&["run", &job]));
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    for entry in walk(&f.path("out")) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(KEY),
            "{} holds the key",
            entry.display()
        );
    }
}

#[test]
fn azure_batches_go_to_the_resources_routes_with_the_deployment_as_each_lines_model() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        azure_api_version: Some("2024-10-21".into()),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(4, "item");
    f.write("data.csv", csv_of(&rows));
    let job = f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "data.csv"

[[messages]]
role = "user"
content = "{{{{ text }}}}"

[model]
provider = "azure"
base_url = "{}"
deployment = "batch-deploy"
name = "gpt-4o-mini"
api_version = "2024-10-21"
max_tokens = 20

[run]
mode = "batch"
max_retries = 2
timeout_s = 5

[output]
path = "out/result.jsonl"
"#,
            s.root_url()
        ),
    );
    let job = job.to_str().unwrap();
    let run = |args: &[&str]| {
        ran(f
            .cmd(args)
            .env_remove("OPENAI_API_KEY")
            .env("AZURE_OPENAI_API_KEY", KEY)
            .output()
            .unwrap())
    };
    ok(&run(&["run", job]));
    let b = &s.batches()[0];
    assert_eq!(b["endpoint"], "/chat/completions");
    let content = s
        .file_content(b["input_file_id"].as_str().unwrap())
        .unwrap();
    for l in String::from_utf8(content).unwrap().lines() {
        let l: Value = serde_json::from_str(l).unwrap();
        assert_eq!(l["url"], "/chat/completions");
        assert_eq!(l["body"]["model"], "batch-deploy");
    }
    s.complete_batches();
    ok(&run(&["batch", "collect", job]));
    assert_eq!(ok_completions(&f), echo_all(&rows));
    assert!(f.records().iter().all(|r| r["mode"] == "batch"));
    billed_equals_kept(&s, &f);
}

#[test]
fn a_create_whose_answer_is_lost_is_looked_up_and_never_made_twice() {
    // Every one of the three creates makes its batch and loses the answer.
    let s = spawn_background(Config {
        batch_auto_advance: true,
        batch_create_answers_lost: 3,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(60, "item");
    let job = batch_job(&f, &s, &rows, "max_requests_per_file = 20", "");
    let r = f.run(&["run", "--wait", &job]);
    ok(&r);
    let st = s.stats();
    assert_eq!(st.batches_created, 3, "60 rows in files of 20, each once");
    assert_eq!(st.batch_requests_billed, 60, "every row billed once");
    assert_eq!(ok_completions(&f), echo_all(&rows));
    assert_eq!(f.records().len(), 60);
    billed_equals_kept(&s, &f);
}

#[test]
fn a_part_left_creating_is_known_to_status_cancel_and_fresh() {
    let s = spawn_background(Config {
        batch_lines_per_step: Some(2),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(6, "item");
    let job = batch_job(&f, &s, &rows, "", "");
    // Killed after the server made the batch, before its id was on record.
    let r = f
        .cmd(&["run", &job])
        .env("PROMPTMILL_FAILPOINT", "batch:create-done")
        .output()
        .unwrap();
    assert!(!r.status.success(), "the failpoint killed it");
    assert_eq!(s.stats().batches_created, 1);

    let r = f.run(&["batch", "status", &job]);
    ok(&r);
    assert!(
        r.stdout.contains("batch_1"),
        "status finds it: {}",
        r.stdout
    );
    assert!(r.stdout.contains("answer was lost"), "{}", r.stdout);

    // --fresh would forget rows the server may be running.
    let r = f.run(&["run", "--fresh", &job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("still open"), "{}", r.stderr);
    assert_eq!(s.stats().batches_created, 1);

    s.advance_batches();
    s.advance_batches(); // two of six lines answered
    let r = f.run(&["batch", "cancel", &job]);
    ok(&r);
    assert!(r.stdout.contains("batch_1: cancelling"), "{}", r.stdout);
    assert_eq!(s.stats().batches_cancelled, 1);
    s.advance_batches(); // cancelling → cancelled
    ok(&f.run(&["batch", "collect", &job]));
    billed_equals_kept(&s, &f);
    // The rows the cancel left go in the next submission; none is billed twice.
    ok(&f.run(&["run", &job]));
    s.complete_batches();
    ok(&f.run(&["batch", "collect", &job]));
    assert_eq!(ok_completions(&f), echo_all(&rows));
    assert_eq!(s.stats().batches_created, 2);
    assert_eq!(s.stats().batch_requests_billed, 6);
    billed_equals_kept(&s, &f);
}

#[test]
fn a_create_that_fails_every_try_stays_creating_and_the_rerun_submits_once() {
    // Every create of the first run answers 500 (1 try and 1 retry): nothing is made.
    let s = spawn_background(Config {
        batch_auto_advance: true,
        batch_create_failures: 2,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = texts(6, "item");
    let job = batch_job(&f, &s, &rows, "", "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_retries = 4", "max_retries = 1");
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", &job]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(s.stats().batches_created, 0);
    // The part waits, creating: --fresh would forget rows a lagging server might hold.
    assert_eq!(f.run(&["run", "--fresh", &job]).code, 2);
    let r = f.run(&["batch", "status", &job]);
    ok(&r);
    assert!(r.stdout.contains("holds no batch of it"), "{}", r.stdout);
    // The rerun looks, finds none, and submits the rows once.
    ok(&f.run(&["run", "--wait", &job]));
    assert_eq!(s.stats().batches_created, 1);
    assert_eq!(s.stats().batch_requests_billed, 6);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    billed_equals_kept(&s, &f);
}
