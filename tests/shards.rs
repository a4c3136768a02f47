//! Shards, merge, status, and request files for other engines, through the real binary:
//! every row in exactly one shard whatever the input's order; shards run side by side and
//! merged equal one run; merge refuses other jobs' outputs and reports missing rows; export →
//! another engine's batch run (the fake server's batch endpoint) → import completes the job.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::util::*;

/// The user texts of the request lines in an exported file.
fn exported_texts(path: &std::path::Path) -> BTreeSet<String> {
    read_jsonl(path)
        .iter()
        .map(|l| {
            l["body"]["messages"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn every_row_is_in_exactly_one_shard_whatever_the_inputs_order() {
    let f = Fixture::new();
    let rows = texts(60, "item");
    f.write("data.csv", csv_of(&rows));
    let job = f.job("data.csv", "{{ text }}", "", "", "http://127.0.0.1:9/v1");
    let job = job.to_str().unwrap();
    let shards = |tag: &str| -> Vec<BTreeSet<String>> {
        (1..=4)
            .map(|k| {
                let out = format!("{tag}-{k}.jsonl");
                ok(&f.run(&["export", job, "--shard", &format!("{k}/4"), "-o", &out]));
                exported_texts(&f.path(&out))
            })
            .collect()
    };
    let before = shards("a");
    let union: BTreeSet<String> = before.iter().flatten().cloned().collect();
    assert_eq!(
        union,
        rows.iter().cloned().collect(),
        "the union is the input"
    );
    assert_eq!(
        before.iter().map(BTreeSet::len).sum::<usize>(),
        rows.len(),
        "no row is in two shards"
    );
    assert!(before.iter().all(|s| !s.is_empty()), "{before:?}");
    // Re-exported in another order: every shard gets the same rows.
    let mut reversed = rows.clone();
    reversed.reverse();
    f.write("data.csv", csv_of(&reversed));
    assert_eq!(shards("b"), before);

    // With an id column, the id decides: the same ids land in the same shards even when
    // their text changes.
    let mut s = String::from("sku,text\n");
    for (i, t) in rows.iter().enumerate() {
        s.push_str(&format!("sku{i},{t}\n"));
    }
    f.write("ids.csv", &s);
    let with_id = f.job("ids.csv", "{{ text }}", "", "", "http://127.0.0.1:9/v1");
    let text = std::fs::read_to_string(&with_id)
        .unwrap()
        .replace("path = \"ids.csv\"", "path = \"ids.csv\"\nid = \"sku\"");
    std::fs::write(&with_id, text).unwrap();
    let owner = |csv: &str| -> BTreeMap<String, u32> {
        f.write("ids.csv", csv);
        let mut m = BTreeMap::new();
        for k in 1..=3u32 {
            let out = format!("ids-{k}.jsonl");
            ok(&f.run(&[
                "export",
                with_id.to_str().unwrap(),
                "--shard",
                &format!("{k}/3"),
                "-o",
                &out,
            ]));
            for l in read_jsonl(&f.path(&out)) {
                let id = l["custom_id"].as_str().unwrap().to_string();
                // custom_id: r{row}-{fp}-{idh}; the id hash is the stable part here.
                m.insert(id.rsplit('-').next().unwrap().to_string(), k);
            }
        }
        m
    };
    let a = owner(&s);
    let edited = s.replace("item", "changed item");
    let b = owner(&edited);
    assert_eq!(a.len(), 60);
    assert_eq!(a, b, "an id keeps its shard when its row's text changes");
}

#[test]
fn shards_run_side_by_side_then_merge_equals_one_run() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(90, "item");
    f.write("data.csv", csv_of(&rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();

    // Three shards at once on one machine: their own outputs and locks.
    let children: Vec<_> = (1..=3)
        .map(|k| {
            f.cmd(&["run", "--quiet", &job, "--shard", &format!("{k}/3")])
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        assert!(c.wait_with_output().unwrap().status.success());
    }
    assert_eq!(s.stats().requests, 90, "each row sent by exactly one shard");
    for k in 1..=3 {
        let out = f.path(&format!("out/result.shard-{k}-of-3.jsonl"));
        assert!(out.exists());
        assert!(f.path(&format!("out/result.shard-{k}-of-3.csv")).exists());
        let sum: Value = serde_json::from_str(
            &std::fs::read_to_string(
                f.path(&format!("out/result.shard-{k}-of-3.jsonl.summary.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            sum["rows_ok"].as_u64().unwrap(),
            read_jsonl(&out).len() as u64
        );
    }

    let r = f.run(&[
        "merge",
        "out/result.shard-*.jsonl",
        "--csv",
        "out/result.csv",
    ]);
    ok(&r);
    let merged = f.records();
    assert_eq!(merged.len(), 90);

    // One run of the whole job, elsewhere: the same rows, the same completions, same order.
    let single = f.run(&["run", "--quiet", &job, "--output", "single/all.jsonl"]);
    ok(&single);
    let one = read_jsonl(&f.path("single/all.jsonl"));
    let key = |r: &Value| {
        (
            r["row"].as_u64().unwrap(),
            r["input"]["text"].as_str().unwrap().to_string(),
            r["completion"].as_str().unwrap().to_string(),
            r["fingerprint"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        merged.iter().map(key).collect::<Vec<_>>(),
        one.iter().map(key).collect::<Vec<_>>()
    );
    let csv = std::fs::read_to_string(f.path("out/result.csv")).unwrap();
    assert_eq!(csv.lines().count(), 91);
    let sum = f.summary();
    assert_eq!(sum["rows_ok"], 90);
    assert!(
        sum["latency_p50_ms"].is_u64(),
        "percentiles from the records"
    );
    let cost: f64 = merged.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((sum["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12);
}

#[test]
fn shards_from_job_completion_index_and_status_counts_each_shard() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = texts(40, "item");
    f.write("data.csv", csv_of(&rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();
    // Kubernetes Indexed Job pods 0 and 2 of 3 ran; pod 1 did not.
    for i in [0, 2] {
        let r = ran(f
            .cmd(&["run", "--quiet", &job, "--shards", "3"])
            .env("JOB_COMPLETION_INDEX", i.to_string())
            .output()
            .unwrap());
        ok(&r);
    }
    let r = f.run(&["run", "--quiet", &job, "--shards", "3"]);
    assert_eq!(r.code, 2, "no index, no shard");
    assert!(r.stderr.contains("JOB_COMPLETION_INDEX"), "{}", r.stderr);
    let n1 = read_jsonl(&f.path("out/result.shard-1-of-3.jsonl")).len() as u64;
    let n3 = read_jsonl(&f.path("out/result.shard-3-of-3.jsonl")).len() as u64;
    assert!(!f.path("out/result.shard-2-of-3.jsonl").exists());
    assert_eq!(s.stats().requests, n1 + n3);

    let st = f.run(&["status", &job, "--shards", "3"]);
    ok(&st);
    let lines: Vec<Vec<String>> = st
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    let n2 = 40 - n1 - n3;
    assert_eq!(lines[0][..3], [n1.to_string(), "0".into(), "0".into()]);
    assert_eq!(lines[1][..3], ["0".to_string(), "0".into(), n2.to_string()]);
    assert_eq!(lines[2][..3], [n3.to_string(), "0".into(), "0".into()]);
    assert_eq!(
        lines[3][..3],
        [(n1 + n3).to_string(), "0".into(), n2.to_string()]
    );
    assert_eq!(s.stats().requests, n1 + n3, "status sends nothing");

    // The outputs alone say the same, from what each shard recorded.
    let st = f.run(&["status", "out/result.shard-*.jsonl"]);
    ok(&st);
    assert!(st.stdout.contains(&format!("{}", n1 + n3)), "{}", st.stdout);

    // Merging what there is reports the rows no shard has.
    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{n2} rows are in no shard")),
        "{}",
        r.stderr
    );
    assert_eq!(f.records().len() as u64, n1 + n3);
}

#[test]
fn merge_refuses_outputs_of_different_jobs_and_keeps_one_record_per_row() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(20, "item")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();
    ok(&f.run(&["run", "--quiet", &job, "--shard", "1/2"]));
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace("gpt-4o-mini", "gpt-4o")).unwrap();
    ok(&f.run(&["run", "--quiet", &job, "--shard", "2/2"]));
    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("different jobs"), "{}", r.stderr);
    assert!(
        r.stderr.contains("gpt-4o-mini") && r.stderr.contains("gpt-4o"),
        "{}",
        r.stderr
    );

    // Another template: refused too.
    std::fs::write(&job, text.replace("{{ text }}", "Say: {{ text }}")).unwrap();
    ok(&f.run(&["run", "--quiet", &job, "--shard", "2/2", "--fresh"]));
    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("messages"), "{}", r.stderr);

    // The same job twice over (a whole run and a shard of it): one record per row.
    std::fs::write(&job, &text).unwrap();
    ok(&f.run(&["run", "--quiet", &job, "--output", "whole/all.jsonl"]));
    let r = f.run(&[
        "merge",
        "whole/all.jsonl",
        "out/result.shard-1-of-2.jsonl",
        "-o",
        "merged/m.jsonl",
    ]);
    ok(&r);
    assert!(r.stderr.contains("more than one shard"), "{}", r.stderr);
    let m = read_jsonl(&f.path("merged/m.jsonl"));
    assert_eq!(m.len(), 20);
    let rows: BTreeSet<u64> = m.iter().map(|r| r["row"].as_u64().unwrap()).collect();
    assert_eq!(rows.len(), 20);
}

/// Another engine's batch run: the request file uploaded to the fake server's Files and
/// Batches endpoints over HTTP, run, and its output and error files joined into one results
/// file, as `vllm run-batch` would write it.
fn run_elsewhere(s: &FakeServer, requests: &std::path::Path) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = std::fs::read(requests).unwrap();
    let base = s.base_url();
    let id = rt.block_on(async {
        let c = reqwest::Client::new();
        let part = reqwest::multipart::Part::bytes(body).file_name("requests.jsonl");
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", part);
        let f: Value = c
            .post(format!("{base}/files"))
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let b: Value = c
            .post(format!("{base}/batches"))
            .json(&serde_json::json!({
                "input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        b["id"].as_str().unwrap().to_string()
    });
    s.complete_batches();
    let b = s.batches().into_iter().find(|b| b["id"] == id).unwrap();
    let mut out = Vec::new();
    for k in ["output_file_id", "error_file_id"] {
        if let Some(fid) = b[k].as_str() {
            out.extend(s.file_content(fid).unwrap());
        }
    }
    out
}

#[test]
fn export_then_another_engines_results_then_import_completes_the_job() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let mut rows = texts(12, "item");
    rows[4] = "bad FAULT:400".into();
    f.write("data.csv", csv_of(&rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();
    // Two rows done online first: export leaves them out.
    ok(&f.run(&["run", "--quiet", &job, "--limit", "2"]));
    ok(&f.run(&["export", &job, "-o", "requests.jsonl"]));
    let lines = read_jsonl(&f.path("requests.jsonl"));
    assert_eq!(lines.len(), 10);
    for l in &lines {
        assert_eq!(l["method"], "POST");
        assert_eq!(l["url"], "/v1/chat/completions");
    }
    let results = run_elsewhere(&s, &f.path("requests.jsonl"));
    // One line for a request this job does not make: reported, not written.
    let mut results = results;
    results.extend_from_slice(
        br#"{"id":"x","custom_id":"r99-00000000000000000000000000000000","response":{"status_code":200,"body":{"choices":[{"message":{"content":"stray"},"finish_reason":"stop"}]}},"error":null}"#,
    );
    results.push(b'\n');
    f.write("results.jsonl", &results);
    let r = f.run(&["import", &job, "results.jsonl"]);
    assert_eq!(r.code, 1, "one row failed\n{}", r.stderr);
    assert!(
        r.stderr.contains("1 result lines match no pending row"),
        "{}",
        r.stderr
    );
    let recs = f.records();
    assert_eq!(recs.len(), 12);
    let ok_rows: Vec<&Value> = recs.iter().filter(|r| r["status"] == "ok").collect();
    assert_eq!(ok_rows.len(), 11);
    for r in &ok_rows {
        assert_eq!(
            r["completion"],
            format!("echo: {}", r["input"]["text"].as_str().unwrap())
        );
    }
    assert!(recs.iter().all(|r| r["completion"] != "stray"));
    assert_eq!(recs[4]["error"]["status"], 400);
    assert!(
        std::fs::read_to_string(f.path("out/result.csv"))
            .unwrap()
            .lines()
            .count()
            == 13
    );
    // Nothing is left to export, and a rerun sends nothing.
    ok(&f.run(&["export", &job, "-o", "again.jsonl"]));
    assert!(read_jsonl(&f.path("again.jsonl")).is_empty());
    let before = s.stats().requests;
    let r = f.run(&["run", "--quiet", &job]);
    assert_eq!(r.code, 1);
    assert_eq!(s.stats().requests, before);
}

// ---------------------------------------------------------------------------------------------
// merge keeps its promises: the old output kept, live shards refused, the order checked, the
// job's CSV. Self-contained (these helpers are used only here).

/// The prompt and completion tokens of every record in `outputs`.
fn kept_tokens(outputs: &[std::path::PathBuf]) -> (u64, u64) {
    outputs
        .iter()
        .flat_map(|p| read_jsonl(p))
        .fold((0, 0), |(p, c), r| {
            (
                p + r["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                c + r["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            )
        })
}

/// What the server billed equals what `outputs` kept.
fn billed_equals_kept(s: &FakeServer, outputs: &[std::path::PathBuf]) {
    let st = s.stats();
    assert_eq!(
        (st.billed_prompt_tokens, st.billed_completion_tokens),
        kept_tokens(outputs),
        "billed vs kept"
    );
}

/// A CSV as rows of cells, the header first.
fn csv_cells(p: &std::path::Path) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(p)
        .unwrap()
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect()
}

fn rows_of(recs: &[Value]) -> Vec<u64> {
    recs.iter().map(|r| r["row"].as_u64().unwrap()).collect()
}

/// Files left in `out/` whose name says they are temporary.
fn temporaries(f: &Fixture) -> Vec<String> {
    std::fs::read_dir(f.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp") || n.contains(".tmp."))
        .collect()
}

#[test]
fn merge_over_an_existing_output_keeps_it_in_prev() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(20, "item")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();
    // The whole job once, then the same job in two shards: their merge lands on that output.
    ok(&f.run(&["run", "--quiet", &job]));
    let whole = std::fs::read(f.path("out/result.jsonl")).unwrap();
    assert_eq!(f.records().len(), 20);
    // A .prev from an earlier --fresh: appended to, not replaced.
    let older = format!(
        "{}\n",
        String::from_utf8_lossy(&whole).lines().next().unwrap()
    );
    f.write("out/result.prev.jsonl", &older);
    for k in 1..=2 {
        ok(&f.run(&["run", "--quiet", &job, "--shard", &format!("{k}/2")]));
    }
    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    ok(&r);
    assert!(
        r.stderr.contains("out/result.prev.jsonl") && r.stderr.contains("moved"),
        "{}",
        r.stderr
    );
    let prev = std::fs::read(f.path("out/result.prev.jsonl")).unwrap();
    assert_eq!(
        prev,
        [older.as_bytes(), &whole].concat(),
        "old .prev, then the old output"
    );
    let merged = f.records();
    assert_eq!(rows_of(&merged), (1..=20).collect::<Vec<_>>());
    let shard_fps: BTreeSet<String> = (1..=2)
        .flat_map(|k| read_jsonl(&f.path(&format!("out/result.shard-{k}-of-2.jsonl"))))
        .map(|r| r["fingerprint"].as_str().unwrap().to_string())
        .collect();
    let merged_fps: BTreeSet<String> = merged
        .iter()
        .map(|r| r["fingerprint"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        merged_fps, shard_fps,
        "the merged output is the shards' records"
    );
    let csv = csv_cells(&f.path("out/result.csv"));
    assert_eq!(csv.len() - 1, merged.len(), "a CSV line per merged record");
    // Billed: the whole run and the shards, 40 answers; kept: the output and the old one.
    assert_eq!(s.stats().requests, 40);
    let whole_file = f.write("whole-copy.jsonl", &whole);
    billed_equals_kept(&s, &[f.path("out/result.jsonl"), whole_file]);

    // Merging again keeps the merged output as well.
    let first_merge = std::fs::read(f.path("out/result.jsonl")).unwrap();
    ok(&f.run(&["merge", "out/result.shard-*.jsonl"]));
    let prev = std::fs::read(f.path("out/result.prev.jsonl")).unwrap();
    assert_eq!(prev, [older.as_bytes(), &whole, &first_merge].concat());
    assert_eq!(
        std::fs::read(f.path("out/result.jsonl")).unwrap(),
        first_merge
    );
}

#[test]
fn merge_refuses_a_shard_a_live_run_holds_and_a_locked_target() {
    // Slow answers: the second shard's run is still going when the merge starts.
    let s = spawn_background(Config {
        latency_ms: 300,
        ..Config::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(40, "item")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();
    ok(&f.run(&["run", "--quiet", &job, "--shard", "1/2"]));
    // Shard 2 begun earlier (so it has its stamp and some records), now resumed.
    ok(&f.run(&["run", "--quiet", &job, "--shard", "2/2", "--limit", "10"]));
    let begun = read_jsonl(&f.path("out/result.shard-2-of-2.jsonl")).len();
    assert!((1..20).contains(&begun), "{begun}");
    assert!(f.path("out/result.shard-2-of-2.jsonl.job.json").exists());
    let mut child = f
        .cmd(&["run", "--quiet", &job, "--shard", "2/2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Held once the run has written its pid into the lock (Lock::acquire).
    let lock = f.path("out/result.shard-2-of-2.jsonl.lock");
    let pid = format!("pid {}", child.id());
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.starts_with(&pid)) {
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        assert!(
            start.elapsed().as_secs() < 30,
            "the run never took its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run was still going"
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    for part in [
        "out/result.shard-2-of-2.jsonl",
        "result.shard-2-of-2.jsonl.lock",
        &pid,
    ] {
        assert!(r.stderr.contains(part), "{part}: {}", r.stderr);
    }
    assert!(!f.path("out/result.jsonl").exists(), "nothing merged");
    assert!(!f.path("out/result.csv").exists());
    assert!(temporaries(&f).is_empty(), "{:?}", temporaries(&f));
    assert!(child.wait().unwrap().success());

    // The target's lock held, as a run holds it: refused too, naming it.
    {
        let held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(f.path("out/result.jsonl.lock"))
            .unwrap();
        held.lock().unwrap();
        let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("out/result.jsonl.lock"), "{}", r.stderr);
        assert!(!f.path("out/result.jsonl").exists());
    }
    // Both free: the merge has every row.
    ok(&f.run(&["merge", "out/result.shard-*.jsonl"]));
    let merged = f.records();
    assert_eq!(rows_of(&merged), (1..=40).collect::<Vec<_>>());
    assert_eq!(csv_cells(&f.path("out/result.csv")).len() - 1, 40);
    assert_eq!(s.stats().requests, 40, "each row sent once");
    billed_equals_kept(&s, &[f.path("out/result.jsonl")]);
}

#[test]
fn merge_refuses_a_shard_out_of_row_order_and_leaves_the_target() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_of(&texts(20, "item")));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap().to_string();
    for k in 1..=2 {
        ok(&f.run(&["run", "--quiet", &job, "--shard", &format!("{k}/2")]));
    }
    ok(&f.run(&["merge", "out/result.shard-*.jsonl"]));
    let target = std::fs::read(f.path("out/result.jsonl")).unwrap();
    let csv = std::fs::read(f.path("out/result.csv")).unwrap();
    // Shard 1 edited by hand: its last record moved to the front.
    let shard = f.path("out/result.shard-1-of-2.jsonl");
    let text = std::fs::read_to_string(&shard).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    let last = lines.pop().unwrap();
    lines.insert(0, last);
    std::fs::write(&shard, lines.join("\n") + "\n").unwrap();

    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for part in [
        "out/result.shard-1-of-2.jsonl",
        "line 2:",
        "not in row order",
    ] {
        assert!(r.stderr.contains(part), "{part}: {}", r.stderr);
    }
    assert_eq!(std::fs::read(f.path("out/result.jsonl")).unwrap(), target);
    assert_eq!(std::fs::read(f.path("out/result.csv")).unwrap(), csv);
    assert!(!f.path("out/result.prev.jsonl").exists(), "nothing moved");
    assert!(temporaries(&f).is_empty(), "{:?}", temporaries(&f));

    // A run of the shard puts it back in order, sending nothing; then it merges.
    let sent = s.stats().requests;
    ok(&f.run(&["run", "--quiet", &job, "--shard", "1/2"]));
    assert_eq!(s.stats().requests, sent, "nothing sent again");
    ok(&f.run(&["merge", "out/result.shard-*.jsonl"]));
    assert_eq!(std::fs::read(f.path("out/result.jsonl")).unwrap(), target);
    assert_eq!(
        std::fs::read(f.path("out/result.prev.jsonl")).unwrap(),
        target
    );
    assert_eq!(s.stats().requests, 20);
    billed_equals_kept(&s, &[f.path("out/result.jsonl")]);
}

#[test]
fn merged_csv_is_the_jobs_csv_escaped_as_the_job_says_without_csv_given() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let looks = ["=1+1", "+cmd", "-2", "@SUM(A1)", "plain"];
    let mut data = String::from("n,text\n");
    for i in 1..=20 {
        // Each text its own request (identical ones would be sent once and copied).
        data.push_str(&format!("{i},{} {i}\n", looks[i % looks.len()]));
    }
    f.write("data.csv", &data);
    // The fake server answers a schema's `enum` with its first value: a formula.
    f.write(
        "schemas/v.json",
        r#"{"type": "object", "properties": {
              "verdict": {"type": "string", "enum": ["=HYPERLINK(\"http://x\")"]},
              "note": {"type": "string", "maxLength": 40}},
            "required": ["verdict", "note"], "additionalProperties": false}"#,
    );
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_tokens = 20", "max_tokens = 200");
    // `[output]` is the job file's last table: appended keys land in it.
    std::fs::write(
        &job,
        text + "schema = \"schemas/v.json\"\ncsv_escape_formulas = true\n",
    )
    .unwrap();
    let job = job.to_str().unwrap().to_string();
    for k in 1..=2 {
        ok(&f.run(&["run", "--quiet", &job, "--shard", &format!("{k}/2")]));
    }
    assert!(
        !f.path("out/result.csv").exists(),
        "the shards write their own CSVs"
    );
    let stamp_path = |k: u32| f.path(&format!("out/result.shard-{k}-of-2.jsonl.job.json"));
    let stamp: Value =
        serde_json::from_str(&std::fs::read_to_string(stamp_path(1)).unwrap()).unwrap();
    assert_eq!(stamp["csv"], "result.csv");
    assert_eq!(stamp["csv_escape_formulas"], true);
    assert_eq!(stamp["csv_input_columns"], serde_json::json!(["n", "text"]));
    assert_eq!(
        stamp["csv_data_columns"],
        serde_json::json!(["verdict", "note"])
    );

    let r = f.run(&["merge", "out/result.shard-*.jsonl"]);
    ok(&r);
    assert!(r.stderr.contains("out/result.csv"), "{}", r.stderr);
    let merged_stamp: Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("out/result.jsonl.job.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(merged_stamp["shard"], Value::Null);
    assert_eq!(merged_stamp["csv"], "result.csv");
    assert_eq!(merged_stamp["csv_escape_formulas"], true);
    let merged = f.records();
    assert_eq!(merged.len(), 20);
    let rows = csv_cells(&f.path("out/result.csv"));
    assert_eq!(rows.len() - 1, merged.len(), "a CSV line per merged record");
    let header = &rows[0];
    assert_eq!(header[..5], ["n", "text", "completion", "verdict", "note"]);
    let at = |name: &str| header.iter().position(|h| h == name).unwrap();
    for (row, rec) in rows[1..].iter().zip(&merged) {
        let input = rec["input"]["text"].as_str().unwrap();
        let want = if input.starts_with(['=', '+', '-', '@']) {
            format!("'{input}")
        } else {
            input.to_string()
        };
        assert_eq!(row[at("text")], want, "input cell of row {}", rec["row"]);
        assert_eq!(row[at("verdict")], "'=HYPERLINK(\"http://x\")");
        assert_eq!(row[at("n")], rec["row"].to_string(), "in row order");
    }
    // The same lines as the shards' own CSVs (the runs' CSV writer, the same options).
    let mut shard_lines: Vec<Vec<String>> = (1..=2)
        .flat_map(|k| csv_cells(&f.path(&format!("out/result.shard-{k}-of-2.csv"))).split_off(1))
        .collect();
    shard_lines.sort_by_key(|l| l[0].parse::<u64>().unwrap());
    assert_eq!(rows[1..], shard_lines[..]);

    // The data columns are the stamp's: reversed there, reversed in the merged CSV.
    for k in 1..=2 {
        let text = std::fs::read_to_string(stamp_path(k)).unwrap();
        let mut st: Value = serde_json::from_str(&text).unwrap();
        st["csv_data_columns"] = serde_json::json!(["note", "verdict"]);
        std::fs::write(stamp_path(k), st.to_string()).unwrap();
    }
    ok(&f.run(&["merge", "out/result.shard-*.jsonl"]));
    let rows = csv_cells(&f.path("out/result.csv"));
    assert_eq!(rows[0][..5], ["n", "text", "completion", "note", "verdict"]);

    // A stamp from before these fields still reads: no CSV named, so none without --csv, and
    // no escaping known, so none in the one asked for.
    for k in 1..=2 {
        let text = std::fs::read_to_string(stamp_path(k)).unwrap();
        let mut st: Value = serde_json::from_str(&text).unwrap();
        for key in [
            "csv",
            "csv_escape_formulas",
            "csv_input_columns",
            "csv_data_columns",
        ] {
            st.as_object_mut().unwrap().remove(key);
        }
        std::fs::write(stamp_path(k), st.to_string()).unwrap();
    }
    std::fs::remove_file(f.path("out/result.csv")).unwrap();
    ok(&f.run(&["merge", "out/result.shard-*.jsonl"]));
    assert!(!f.path("out/result.csv").exists());
    ok(&f.run(&["merge", "out/result.shard-*.jsonl", "--csv", "out/old.csv"]));
    let rows = csv_cells(&f.path("out/old.csv"));
    assert_eq!(rows.len() - 1, 20);
    let at = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    assert!(
        rows[1..].iter().any(|r| r[at("text")] == "=1+1 5"),
        "{rows:?}"
    );
    assert_eq!(s.stats().requests, 20);
    billed_equals_kept(&s, &[f.path("out/result.jsonl")]);
}
