//! The quiet paths where a row could be lost, paid twice or leaked: each through the real
//! binary, counting what the fake server billed against what the output kept.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::util::*;

#[test]
fn a_dry_run_with_retry_failed_counts_the_rows_the_run_would_send_again() {
    let s = server();
    let f = Fixture::new();
    let mut rows = String::new();
    for i in 0..5 {
        rows.push_str(&format!("{{\"t\": \"bad {i} FAULT:400:1\"}}\n"));
    }
    rows.push_str("{\"t\": \"good\"}\n");
    f.write("data.jsonl", rows);
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    assert_eq!(f.run(&["run", job]).code, 1);
    let plain = f.run(&["run", "--dry-run", job]);
    ok(&plain);
    assert!(
        plain.stdout.contains("rows to send      0"),
        "{}",
        plain.stdout
    );
    let again = f.run(&["run", "--dry-run", "--retry-failed", job]);
    ok(&again);
    assert!(
        again.stdout.contains("rows to send      5"),
        "{}",
        again.stdout
    );
    let before = s.stats().requests;
    ok(&f.run(&["run", "--retry-failed", job]));
    assert_eq!(
        s.stats().requests - before,
        5,
        "the dry run's count is what was sent"
    );
}

#[test]
fn durations_past_their_limit_are_refused_naming_the_key_and_the_limit() {
    let f = Fixture::new();
    f.write("data.csv", "t\na\n");
    for (table, key, limit) in [
        ("run", "timeout_s", "86400"),
        ("run", "outage_s", "86400"),
        ("run", "shutdown_grace_s", "3600"),
        ("batch", "poll_s", "3600"),
    ] {
        let job = f.job("data.csv", "{{ t }}", "", "", "http://127.0.0.1:9/v1");
        let text = std::fs::read_to_string(&job).unwrap();
        // The fixture's own timeout_s gives way to the one under test.
        let text = text.replace("timeout_s = 5\n", "");
        let text = if table == "run" {
            text.replace("[run]\n", &format!("[run]\n{key} = 1e20\n"))
        } else {
            format!("{text}\n[batch]\n{key} = 1e20\n")
        };
        std::fs::write(&job, text).unwrap();
        for cmd in ["validate", "run"] {
            let r = f.run(&[cmd, job.to_str().unwrap()]);
            assert_eq!(r.code, 2, "{cmd} {key}: {}", r.stderr);
            assert!(r.stderr.contains(&format!("{table}.{key}")), "{}", r.stderr);
            assert!(r.stderr.contains(limit), "{}", r.stderr);
            assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        }
    }
}

#[test]
fn an_image_that_is_not_a_regular_file_fails_its_row_and_nothing_is_sent_for_it() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", "img\n/dev/zero\n");
    f.write("pic.png", b"\x89PNG not really");
    let job = f.job("data.csv", "describe", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace(
            "content = \"\"\"describe\"\"\"",
            "content = \"\"\"describe\"\"\"\nimages = [\"{{ img }}\"]",
        )
        .replace("gpt-4o-mini", "gpt-4o");
    std::fs::write(&job, text).unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["status"], "error");
    let msg = recs[0]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("not a regular file"), "{msg}");
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn a_jsonl_input_that_starts_with_a_byte_order_mark_reads_its_first_row() {
    let s = server();
    let f = Fixture::new();
    f.write("data.jsonl", "\u{feff}{\"t\": \"one\"}\n{\"t\": \"two\"}\n");
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    ok(&f.run(&["run", job.to_str().unwrap()]));
    let recs = f.records();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    assert_eq!(s.stats().requests, 2, "billed");
}

#[test]
fn a_journal_saved_without_its_last_newline_keeps_its_last_record() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(4, "row")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    ok(&f.run(&["run", job]));
    // Saved by an editor that drops the final newline.
    let out = f.path("out/result.jsonl");
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::write(&out, text.trim_end_matches('\n')).unwrap();
    ok(&f.run(&["run", job]));
    assert_eq!(s.stats().requests, 4, "no row paid twice");
    assert_eq!(f.records().len(), 4);
    assert!(!f.path("out/result.stale.jsonl").exists());
}

#[test]
fn a_record_another_tool_trimmed_still_counts_as_done_and_compacts() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(3, "row")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    ok(&f.run(&["run", job]));
    // A tool rewrote every record without `attempts`, `latency_ms` and `total_tokens`.
    let out = f.path("out/result.jsonl");
    let trimmed: String = f
        .records()
        .into_iter()
        .map(|mut r| {
            let o = r.as_object_mut().unwrap();
            o.remove("attempts");
            o.remove("latency_ms");
            o["usage"].as_object_mut().unwrap().remove("total_tokens");
            format!("{}\n", serde_json::to_string(&r).unwrap())
        })
        .collect();
    std::fs::write(&out, trimmed).unwrap();
    // A new first row renumbers the others: the rerun rewrites every record it keeps.
    let mut rows = vec!["first".to_string()];
    rows.extend(texts(3, "row"));
    f.write("data.csv", csv_of(&rows));
    let r = f.run(&["run", job]);
    ok(&r);
    assert_eq!(s.stats().requests, 4, "only the new row was sent");
    let recs = f.records();
    assert_eq!(recs.len(), 4, "{}", r.stderr);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    assert_eq!(recs[1]["row"], 2, "renumbered");
    assert_eq!(recs[1]["attempts"], 0, "a missing count reads as 0");
}

#[test]
fn a_dot_env_in_a_parent_folder_is_not_read() {
    let s = spawn_background(Config {
        require_key: Some("from-the-parent".into()),
        ..Config::default()
    });
    let f = Fixture::new();
    // The parent's .env names a key; the working folder (the fixture's `job` folder) has none.
    f.write(".env", "PM_PARENT_KEY=from-the-parent\n");
    f.write("job/data.csv", "t\na\n");
    let job = f.job(
        "job/data.csv",
        "{{ t }}",
        "api_key_env = \"PM_PARENT_KEY\"",
        "",
        &s.base_url(),
    );
    let moved = f.path("job/job.toml");
    std::fs::rename(&job, &moved).unwrap();
    let text = std::fs::read_to_string(&moved)
        .unwrap()
        .replace("path = \"job/data.csv\"", "path = \"data.csv\"");
    std::fs::write(&moved, text).unwrap();
    let run_in_job_folder = || {
        ran(f
            .cmd(&["run", "job.toml"])
            .current_dir(f.path("job"))
            .env_remove("PM_PARENT_KEY")
            .output()
            .unwrap())
    };
    let r = run_in_job_folder();
    // On loopback no key is needed to try, so the request goes out without one and is refused:
    // the parent's key was never read.
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!r.stderr.contains("from-the-parent"));
    // The same file in the working folder is read.
    f.write("job/.env", "PM_PARENT_KEY=from-the-parent\n");
    let r = run_in_job_folder();
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_redirect_to_another_host_never_gets_the_azure_key() {
    // The other host: 127.0.0.2 is loopback too, but another origin.
    let other = TcpListener::bind("127.0.0.2:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for c in other.incoming().flatten().take(20) {
            seen2.fetch_add(1, Ordering::SeqCst);
            drop(c);
        }
    });
    let base = redirector(format!("http://{other_addr}/steal"));
    let f = Fixture::new();
    f.write("data.csv", "t\na\nb\n");
    f.write(
        "job.toml",
        format!(
            "[input]\npath = \"data.csv\"\n[[messages]]\nrole = \"user\"\ncontent = \"{{{{ t }}}}\"\n\
             [model]\nprovider = \"azure\"\nname = \"gpt-4o-mini\"\ndeployment = \"d1\"\n\
             api_version = \"2024-10-21\"\nbase_url = \"{base}\"\nmax_tokens = 5\n\
             [run]\nmax_retries = 0\ntimeout_s = 5\n[output]\npath = \"out/result.jsonl\"\n"
        ),
    );
    let r = ran(f
        .cmd(&["run", "job.toml"])
        .env("AZURE_OPENAI_API_KEY", KEY)
        .output()
        .unwrap());
    assert_ne!(r.code, 0, "{}", r.stderr);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the other host was contacted"
    );
    let all = format!(
        "{}{}",
        r.stderr,
        std::fs::read_to_string(f.path("out/result.jsonl")).unwrap_or_default()
    );
    assert!(all.contains("redirect"), "{all}");
    assert!(!all.contains(KEY));
}

#[cfg(unix)]
#[test]
fn an_input_from_a_fifo_is_read_once_and_every_row_runs() {
    let s = server();
    let f = Fixture::new();
    let fifo = f.path("rows.csv");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let job = f.job("rows.csv", "{{ text }}", "", "", &s.base_url());
    let feed = |fifo: std::path::PathBuf| {
        std::thread::spawn(move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            w.write_all(csv_rows(400).as_bytes()).unwrap();
        })
    };
    let writer = feed(fifo.clone());
    ok(&f.run(&["run", "--quiet", job.to_str().unwrap()]));
    writer.join().unwrap();
    assert_eq!(f.records().len(), 400);
    assert_eq!(s.stats().requests, 400, "billed == kept");
    // A rerun from the FIFO sends nothing and moves nothing to the stale file.
    let writer = feed(fifo);
    ok(&f.run(&["run", "--quiet", job.to_str().unwrap()]));
    writer.join().unwrap();
    assert_eq!(s.stats().requests, 400);
    assert_eq!(f.records().len(), 400);
    assert!(!f.path("out/result.stale.jsonl").exists());
}

#[test]
fn an_empty_stdin_is_never_taken_for_an_input_whose_rows_all_left() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "path = \"data.csv\"",
        "path = \"data.csv\"\nformat = \"csv\"",
    );
    std::fs::write(&job, text).unwrap();
    ok(&f.run(&["run", job.to_str().unwrap()]));
    let r = ran(f
        .cmd(&["run", "--input", "-", job.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap());
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    assert_eq!(f.records().len(), 3, "{}", r.stderr);
    assert!(!f.path("out/result.stale.jsonl").exists());
    assert_eq!(s.stats().requests, 3);
}

#[test]
fn status_of_a_sharded_job_finds_the_shard_outputs_beside_the_output() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(30));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    ok(&f.run(&["run", "--shard", "1/2", job]));
    let r = f.run(&["status", job]);
    ok(&r);
    assert!(r.stdout.contains("shard 1/2"), "{}", r.stdout);
    assert!(r.stdout.contains("shard 2/2"), "{}", r.stdout);
    assert!(r.stdout.contains("total"), "{}", r.stdout);
    let done = read_jsonl(&f.path("out/result.shard-1-of-2.jsonl")).len() as u64;
    let total = r
        .stdout
        .lines()
        .find(|l| l.contains("total"))
        .unwrap()
        .to_string();
    let nums: Vec<u64> = total
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums[0], done, "{total}");
    assert_eq!(
        nums[0] + nums[2],
        30,
        "done + pending is every row: {total}"
    );
}

#[test]
fn a_row_task_that_panics_stops_the_run_never_exit_0_and_the_rerun_pays_nothing_twice() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(6, "row")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    let r = ran(f
        .cmd(&["run", job])
        .env("PROMPTMILL_FAILPOINT", "row:panic:3")
        .output()
        .unwrap());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("a row task panicked"), "{}", r.stderr);
    let recs = f.records();
    assert!(recs.iter().all(|r| r["row"] != 3), "the row stays pending");
    assert_eq!(recs.len() as u64, s.stats().requests, "every paid row kept");
    ok(&f.run(&["run", job]));
    assert_eq!(f.records().len(), 6);
    assert_eq!(s.stats().requests, 6, "no row paid twice");
}

/// The thread that renders rows dies mid-input: the rows after it are not taken as gone from
/// the input (their records stay in the output, none moves to the stale file), and the run
/// stops with exit 2, never 0.
#[test]
fn a_renderer_that_dies_mid_input_stops_the_run_and_moves_no_record_aside() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(6, "row")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    ok(&f.run(&["run", job]));
    let before = std::fs::read(f.path("out/result.jsonl")).unwrap();
    let r = ran(f
        .cmd(&["run", job])
        .env("PROMPTMILL_FAILPOINT", "render:panic:3")
        .output()
        .unwrap());
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("died before its end"), "{}", r.stderr);
    assert!(!f.path("out/result.stale.jsonl").exists());
    assert_eq!(f.records().len(), 6, "every record is still in the output");
    ok(&f.run(&["run", job]));
    assert_eq!(std::fs::read(f.path("out/result.jsonl")).unwrap(), before);
    assert_eq!(s.stats().requests, 6, "nothing sent again");
}
