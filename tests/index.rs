//! The index file beside an output (`OUTPUT.index`) is a cache: stale after a kill, damaged,
//! deleted or absent (an output written before it existed), the journal decides, and a rerun
//! pays for nothing it holds.

use std::time::Duration;

use crate::util::*;

/// kill -9 while a run appends to an output whose index file describes it as it was before
/// the run: the rerun reads the records appended since from the journal and sends none of
/// them again.
#[test]
fn a_resume_after_kill_9_with_a_stale_index_file_repays_nothing() {
    let (s, f, job) = slow_job(30, 100);
    let job = job.to_str().unwrap();
    ok(&f.run(&["run", "--quiet", job, "--concurrency", "16"]));
    let index = f.path("out/result.jsonl.index");
    let before = std::fs::read(&index).expect("a finished run leaves an index file");
    assert_eq!(s.requests().len(), 100);

    f.write("data.csv", csv_rows(300));
    let mut child = f
        .cmd(&["run", "--quiet", job, "--concurrency", "4"])
        .spawn()
        .unwrap();
    let out = f.path("out/result.jsonl");
    wait_for_lines(&out, 140, Duration::from_secs(30));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        std::fs::read(&index).unwrap(),
        before,
        "the index file still describes the output before the killed run"
    );
    let mut text = std::fs::read(&out).unwrap();
    text.extend_from_slice(b"{\"row\":299,\"id\":\"299\",\"sta");
    std::fs::write(&out, &text).unwrap();
    let done_before = texts_in(&out);
    assert!(done_before.len() >= 140 && done_before.len() < 300);
    rerun_repays_nothing(&f, &s, job, "4", 300, &done_before);
    assert!(
        s.requests().len() <= 300 + 4,
        "at most the requests in flight at the kill are paid again"
    );
}

/// An index file that is damaged, cut short, deleted (as beside an output written before
/// index files existed) or left from another state of the output: the rerun rebuilds it
/// from the journal and sends nothing.
#[test]
fn a_damaged_deleted_or_foreign_index_file_is_rebuilt_and_nothing_is_sent() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(50));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let job = job.to_str().unwrap();
    ok(&f.run(&["run", "--quiet", job]));
    let index = f.path("out/result.jsonl.index");
    let old = std::fs::read(&index).unwrap();
    // The output grows by 10 rows: the old index file now describes another state of it.
    f.write("data.csv", csv_rows(60));
    ok(&f.run(&["run", "--quiet", job]));
    assert_eq!(s.stats().requests, 60);
    let output = std::fs::read(f.path("out/result.jsonl")).unwrap();
    let good = std::fs::read(&index).unwrap();

    let flip = |mut b: Vec<u8>| {
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
        b
    };
    let damages: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("a flipped byte", Some(flip(good.clone()))),
        ("cut short", Some(good[..good.len() / 2].to_vec())),
        ("not an index", Some(b"{\"row\":1}\n".to_vec())),
        ("deleted", None),
        ("another state of the output", Some(old)),
    ];
    for (what, bytes) in damages {
        match bytes {
            Some(b) => std::fs::write(&index, b).unwrap(),
            None => std::fs::remove_file(&index).unwrap(),
        }
        let r = f.run(&["run", "--quiet", job]);
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert_eq!(s.stats().requests, 60, "{what}: nothing sent");
        assert_eq!(f.summary()["rows_skipped"], 60, "{what}");
        assert_eq!(
            std::fs::read(f.path("out/result.jsonl")).unwrap(),
            output,
            "{what}: the output is unchanged"
        );
        assert!(index.exists(), "{what}: rebuilt");
    }
    // `status` and the dry run build what they need in scratch files of their own: the
    // index file is the run's (which holds the lock) to write.
    std::fs::remove_file(&index).unwrap();
    let st = f.run(&["status", job]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(st.stdout.contains("60"), "{}", st.stdout);
    let est = f.run(&["estimate", job]);
    assert_eq!(est.code, 0, "{}", est.stderr);
    assert!(
        !index.exists(),
        "read-only commands leave the index file alone"
    );
    assert_eq!(s.stats().requests, 60);
}
