//! Test support: a job folder in a temp dir, the promptmill binary run against the fake server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use fake_openai::{spawn_background, spawn_background_on, Config, FakeServer};

pub mod azure;
pub mod s3;

pub const KEY: &str = "sk-test-DO-NOT-LEAK-0123456789abcdef";

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("templates")).unwrap();
        Fixture { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A job file with one user message `content`, against `base_url`.
    pub fn job(
        &self,
        input: &str,
        content: &str,
        model_extra: &str,
        run_extra: &str,
        base_url: &str,
    ) -> PathBuf {
        self.write(
            "job.toml",
            format!(
                r#"
[input]
path = "{input}"

[[messages]]
role = "system"
content = "You are terse."

[[messages]]
role = "user"
content = """{content}"""

[model]
name = "gpt-4o-mini"
base_url = "{base_url}"
max_tokens = 20
{model_extra}

[run]
concurrency = 4
max_retries = 4
timeout_s = 5
{run_extra}

[output]
path = "out/result.jsonl"
csv = "out/result.csv"
"#
            ),
        )
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_promptmill"));
        c.args(args)
            .current_dir(self.dir.path())
            .env("OPENAI_API_KEY", KEY)
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PROMPTMILL_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Ran {
        ran(self.cmd(args).output().unwrap())
    }

    pub fn records(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.path("out/result.jsonl"))
    }

    pub fn summary(&self) -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.path("out/result.jsonl.summary.json")).unwrap(),
        )
        .unwrap()
    }
}

pub fn ran(o: Output) -> Ran {
    Ran {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// The records of a JSONL file that must be there: a missing file is a failure, never an
/// empty list (a "no records" assertion must not pass on a file never written).
pub fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    let t = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    t.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The records of a file that a run writes only when it has some (the stale file): none if
/// it is not there.
pub fn read_jsonl_if_there(p: &Path) -> Vec<serde_json::Value> {
    if p.exists() {
        read_jsonl(p)
    } else {
        Vec::new()
    }
}

/// A CSV of `n` rows: id, text = "row i".
pub fn csv_rows(n: usize) -> String {
    let mut s = String::from("id,text\n");
    for i in 1..=n {
        s.push_str(&format!("r{i},row {i}\n"));
    }
    s
}

/// The user message of each request the server received.
pub fn user_texts(server: &FakeServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .map(|b| {
            b["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// A one-column CSV (`text`) of these rows.
pub fn csv_of(texts: &[String]) -> String {
    let mut s = String::from("text\n");
    for t in texts {
        s.push_str(t);
        s.push('\n');
    }
    s
}

/// The run exited 0; otherwise its output is shown.
pub fn ok(r: &Ran) {
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
}

/// The fake server, with its defaults.
pub fn server() -> FakeServer {
    spawn_background(Config::default())
}

/// The fake server answering every request after `latency_ms`.
pub fn slow_server(latency_ms: u64) -> FakeServer {
    spawn_background(Config {
        latency_ms,
        ..Default::default()
    })
}

/// A server answering after `latency_ms` and a job of `rows` rows on it: slow enough that a
/// test can act on the run while it goes.
pub fn slow_job(latency_ms: u64, rows: usize) -> (FakeServer, Fixture, std::path::PathBuf) {
    let s = spawn_background(Config {
        latency_ms,
        ..Default::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(rows));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    (s, f, job)
}

/// How many lines a file has so far, a torn last one included (0 before it exists).
pub fn read_jsonl_lenient(p: &std::path::Path) -> usize {
    std::fs::read_to_string(p)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until a running job has written `n` lines, so a test can kill it mid-run.
pub fn wait_for_lines(p: &std::path::Path, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while read_jsonl_lenient(p) < n {
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `n` texts: "PREFIX 1" to "PREFIX n".
pub fn texts(n: usize, prefix: &str) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// Every file under `dir`, in its subfolders too.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The batch steps a failpoint can stop a run right after, in the order they happen.
pub const BATCH_STEPS: [&str; 8] = [
    "part",
    "uploading",
    "upload-done",
    "uploaded",
    "creating",
    "create-done",
    "created",
    "finished",
];

/// A batch job run to its end with a kill right after `step` is on record (in the `run` that
/// submits, or for `finished` in the `batch collect` that downloads), then the commands that
/// pick up after it: a rerun, the batches ended, a collect, and a last collect for batches the
/// rerun submitted. `env`: the job's key and anything else its runs need.
pub fn batch_killed_at(f: &Fixture, s: &FakeServer, job: &str, step: &str, env: &[(&str, &str)]) {
    let cmd = |args: &[&str], failpoint: Option<&str>| {
        let mut c = f.cmd(args);
        c.envs(env.iter().copied());
        if let Some(fp) = failpoint {
            c.env("PROMPTMILL_FAILPOINT", format!("batch:{fp}"));
        }
        ran(c.output().unwrap())
    };
    if step == "finished" {
        ok(&cmd(&["run", job], None));
    } else {
        let r = cmd(&["run", job], Some(step));
        assert_ne!(r.code, 0, "{step}: the failpoint killed it");
        // Whatever was created on the server is followed, the rest submitted now.
        ok(&cmd(&["run", job], None));
    }
    s.complete_batches();
    if step == "finished" {
        let r = cmd(&["batch", "collect", job], Some(step));
        assert_ne!(r.code, 0, "{step}: the failpoint killed it");
    }
    ok(&cmd(&["batch", "collect", job], None));
    // Batches submitted after the first collect (rows of an abandoned file) end too.
    s.complete_batches();
    ok(&cmd(&["batch", "collect", job], None));
}

/// A budgeted job run three times (`run` runs it): what the records kept never passes `cap`,
/// the budget stopped some rows and let at least two through, and the third run sends nothing.
pub fn budget_holds_across_runs(
    s: &FakeServer,
    f: &Fixture,
    cap: f64,
    rows: usize,
    run: impl Fn() -> Ran,
) {
    let first = run();
    let second = run();
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    let spent: f64 = recs
        .iter()
        .map(|r| r["cost_usd"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        spent <= cap + 1e-9,
        "spent {spent} over the budget ({} / {})",
        first.stderr,
        second.stderr
    );
    assert!(recs.len() < rows, "the budget stopped nothing");
    assert!(recs.len() >= 2, "{}", recs.len());
    let before = s.stats().requests;
    assert_eq!(run().code, first.code);
    assert_eq!(
        s.stats().requests,
        before,
        "a third run spent past the budget"
    );
}

/// A server on 127.0.0.1 that answers every request with a redirect to `to`.
pub fn redirector(to: String) -> String {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten().take(20) {
            let mut c = c;
            let mut buf = [0u8; 8192];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {to}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            );
        }
    });
    format!("http://{addr}")
}

/// The rows' texts in an output's readable records (a torn last line is left out).
pub fn texts_in(path: &Path) -> std::collections::BTreeSet<String> {
    String::from_utf8_lossy(&std::fs::read(path).unwrap())
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|r| r["input"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// The rerun after a kill: every one of `rows` rows ends ok exactly once, in order, none of
/// `done_before` is sent again, and they are counted as skipped.
pub fn rerun_repays_nothing(
    f: &Fixture,
    s: &FakeServer,
    job: &str,
    concurrency: &str,
    rows: usize,
    done_before: &std::collections::BTreeSet<String>,
) {
    let sent_before = s.requests().len();
    let r = f.run(&["run", "--quiet", job, "--concurrency", concurrency]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), rows, "every row exactly once");
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["row"], i as u64 + 1);
        assert_eq!(rec["status"], "ok");
    }
    let resent: Vec<String> = user_texts(s)[sent_before..]
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
