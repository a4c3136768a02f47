//! Object-store paths against a local S3 server (moto): a job whose input, template, schema,
//! image and outputs live in a bucket; a fresh pod resuming from the checkpoint pieces; the
//! conditional-put lock; and a Kubernetes Indexed Job played on one machine (shards in their own
//! folders, one killed and started again elsewhere, then merged on the store), counting what
//! the fake server billed against what the merged output kept.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::util::s3::{Moto, SECRET};
use crate::util::*;

const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// A job on the bucket `data`: rows from `in/rows.csv`, the template and its include from
/// `templates/`, outputs under `out/`.
fn store_job(f: &Fixture, base_url: &str, concurrency: usize, extra_output: &str) -> String {
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "s3://data/in/rows.csv"

[[messages]]
role = "user"
template = "s3://data/templates/ask.tera"

[model]
name = "gpt-4o-mini"
base_url = "{base_url}"
max_tokens = 200

[run]
concurrency = {concurrency}
max_retries = 2
timeout_s = 10

[output]
path = "s3://data/out/blog.jsonl"
checkpoint_s = 0.5
lock_stale_s = 2
{extra_output}
"#
        ),
    );
    "job.toml".into()
}

fn seed(m: &Moto, rows: &[String]) {
    m.bucket("data");
    seed_objects(m, rows);
}

fn seed_objects(m: &Moto, rows: &[String]) {
    m.put("data", "in/rows.csv", csv_of(rows).as_bytes());
    m.put(
        "data",
        "templates/ask.tera",
        b"{% include \"part.tera\" %} {{ text }}",
    );
    m.put("data", "templates/part.tera", b"Write about:");
}

/// `promptmill ARGS` in `f`'s folder with the store's variables and its own working folder
/// (a pod's disk).
fn pod(f: &Fixture, m: &Moto, work: &str, args: &[&str]) -> Command {
    let mut c = f.cmd(args);
    m.env(&mut c);
    c.env("PROMPTMILL_WORK_DIR", f.path(work));
    c
}

fn no_secret_in(bytes: &[u8], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    assert!(!text.contains(SECRET), "the secret is in {what}");
}

fn no_secret_under(dir: &Path) {
    if dir.exists() {
        for p in walk(dir) {
            no_secret_in(
                &std::fs::read(&p).unwrap_or_default(),
                &p.display().to_string(),
            );
        }
    }
}

#[test]
fn a_job_on_the_store_publishes_its_outputs_and_a_fresh_pod_resumes_from_them() {
    let Some(m) = Moto::start() else { return };
    let s = server();
    let f = Fixture::new();
    let rows = texts(20, "topic");
    seed(&m, &rows);
    m.put(
        "data",
        "img/dot.png",
        &base64::engine::general_purpose::STANDARD
            .decode(PNG_1X1)
            .unwrap(),
    );
    m.put(
        "data",
        "schema/post.json",
        br#"{"type":"object","properties":{"title":{"type":"string"}},"required":["title"],"additionalProperties":false}"#,
    );
    let job = store_job(
        &f,
        &s.base_url(),
        4,
        r#"csv = "s3://data/out/blog.csv"
parquet = "s3://data/out/blog.parquet"
schema = "s3://data/schema/post.json""#,
    );
    // The image, from the bucket, in the user message.
    let text = std::fs::read_to_string(f.path(&job)).unwrap().replace(
        "template = \"s3://data/templates/ask.tera\"",
        "template = \"s3://data/templates/ask.tera\"\nimages = [\"s3://data/img/dot.png\"]",
    );
    f.write(&job, text);

    let r = ran(pod(&f, &m, "pod-a", &["run", &job]).output().unwrap());
    ok(&r);
    assert!(
        r.stderr.contains("published to s3://data/out/blog.jsonl"),
        "{}",
        r.stderr
    );
    assert_eq!(s.stats().requests, 20);
    let sent = s.requests();
    let first = serde_json::to_string(&sent[0]).unwrap();
    assert!(
        first.contains("Write about:"),
        "the include came from the bucket: {first}"
    );
    assert!(
        first.contains("data:image/png;base64,"),
        "the image came from the bucket"
    );
    assert!(
        first.contains("json_schema"),
        "the schema came from the bucket"
    );

    let records = m.records("data", "out/blog.jsonl");
    assert_eq!(records.len(), 20, "{}", r.stderr);
    assert!(records.iter().all(|r| r["status"] == "ok"));
    let keys = m.list("data", "out/");
    for k in [
        "out/blog.csv",
        "out/blog.parquet",
        "out/blog.jsonl.summary.json",
        "out/blog.jsonl.report.html",
        "out/blog.jsonl.job.json",
    ] {
        assert!(keys.contains(&k.to_string()), "{k} not in {keys:?}");
    }
    let csv = String::from_utf8(m.get("data", "out/blog.csv").unwrap()).unwrap();
    assert_eq!(csv.lines().count(), 21, "a header and 20 rows");
    assert!(
        csv.lines().next().unwrap().contains("title"),
        "schema fields are columns"
    );
    let pq = m.get("data", "out/blog.parquet").unwrap();
    assert_eq!(&pq[..4], b"PAR1");
    assert!(
        !keys.iter().any(|k| k.ends_with(".lock")),
        "the lock is released: {keys:?}"
    );

    // A fresh pod (an empty working folder) finds everything done: nothing is sent again.
    let r = ran(pod(&f, &m, "pod-b", &["run", &job]).output().unwrap());
    ok(&r);
    assert_eq!(s.stats().requests, 20, "{}", r.stderr);
    assert!(
        r.stderr.contains("skipped (done before)  20"),
        "{}",
        r.stderr
    );
    // Nor does its dry run or its status count anything left.
    let st = ran(pod(&f, &m, "pod-c", &["status", &job]).output().unwrap());
    ok(&st);
    let line = st.stdout.lines().nth(1).unwrap_or_default().to_string();
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cells[..3], ["20", "0", "0"], "{}", st.stdout);

    // The same pod again (a container restarted on its disk): the fetched input is kept as it
    // is while its ETag holds; a changed object is fetched again, and only its new row is sent.
    let fetched = f.path("pod-a/in/s3/data/in/rows.csv");
    let mtime = || std::fs::metadata(&fetched).unwrap().modified().unwrap();
    let before = mtime();
    let pieces = m.list("data", "out/blog.jsonl.ckpt/");
    ok(&ran(pod(&f, &m, "pod-a", &["run", &job]).output().unwrap()));
    assert_eq!(mtime(), before, "fetched again though unchanged");
    assert_eq!(
        m.list("data", "out/blog.jsonl.ckpt/"),
        pieces,
        "a rerun that changed nothing sends no new snapshot"
    );
    assert_eq!(s.stats().requests, 20);
    let mut more = rows.clone();
    more.push("topic 21".into());
    m.put("data", "in/rows.csv", csv_of(&more).as_bytes());
    let r = ran(pod(&f, &m, "pod-a", &["run", &job]).output().unwrap());
    ok(&r);
    assert_eq!(s.stats().requests, 21, "{}", r.stderr);
    assert_eq!(m.records("data", "out/blog.jsonl").len(), 21);

    // The secret is nowhere: not on the store, not in a pod's folder, not in a message.
    no_secret_in(&m.everything("data"), "the bucket");
    no_secret_under(&f.path("pod-a"));
    no_secret_under(&f.path("pod-b"));
    no_secret_in(r.stderr.as_bytes(), "stderr");
}

#[test]
fn a_missing_object_and_a_wrong_secret_are_clear_errors_without_the_secret() {
    let Some(m) = Moto::start() else { return };
    let s = server();
    let f = Fixture::new();
    m.bucket("data");
    let job = store_job(&f, &s.base_url(), 2, "");
    let r = ran(pod(&f, &m, "pod", &["run", &job]).output().unwrap());
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("input.path"), "{}", r.stderr);
    assert!(r.stderr.contains("s3://data/in/rows.csv"), "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    no_secret_in(r.stderr.as_bytes(), "stderr");
    assert_eq!(s.stats().requests, 0);

    // Bounds: a checkpoint interval of 1e20 s is refused, naming the field.
    seed_objects(&m, &texts(2, "x"));
    let text = std::fs::read_to_string(f.path(&job))
        .unwrap()
        .replace("checkpoint_s = 0.5", "checkpoint_s = 1e20");
    f.write(&job, text);
    let r = ran(pod(&f, &m, "pod", &["validate", &job]).output().unwrap());
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("output.checkpoint_s"), "{}", r.stderr);
}

/// Waits until `child` ends, or `limit` passes (then fails).
fn wait(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "the run did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_pods_given_the_same_shard_never_both_run_it() {
    let Some(m) = Moto::start() else { return };
    let s = slow_server(150);
    let f = Fixture::new();
    seed(&m, &texts(40, "topic"));
    let job = store_job(&f, &s.base_url(), 2, "");
    let mut a = pod(&f, &m, "pod-a", &["run", "--quiet", &job])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !m
        .list("data", "out/")
        .contains(&"out/blog.jsonl.lock".to_string())
    {
        assert!(Instant::now() < deadline, "no lock was taken");
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = ran(pod(&f, &m, "pod-b", &["run", "--quiet", &job])
        .output()
        .unwrap());
    assert_ne!(b.code, 0, "the second pod must not run: {}", b.stderr);
    assert!(b.stderr.contains("alive"), "{}", b.stderr);
    assert_eq!(wait(&mut a, Duration::from_secs(60)), 0);
    let a = ran(a.wait_with_output().unwrap());
    assert_eq!(
        s.stats().requests,
        40,
        "every row sent once, by one pod: {}",
        a.stderr
    );
    assert_eq!(m.records("data", "out/blog.jsonl").len(), 40);
}

/// Lines of every checkpoint piece of `output` on the store.
fn lines_in_pieces(m: &Moto, output: &str) -> usize {
    m.list("data", &format!("{output}.ckpt/"))
        .iter()
        .map(|k| {
            String::from_utf8_lossy(&m.get("data", k).unwrap_or_default())
                .lines()
                .count()
        })
        .sum()
}

#[test]
fn an_indexed_job_with_a_pod_killed_and_rescheduled_merges_every_row_once() {
    let Some(m) = Moto::start() else { return };
    // 100 rows a shard, two at a time at 100 ms: about 5 s a pod, 10 checkpoints.
    let s = slow_server(100);
    let f = Fixture::new();
    let rows = texts(300, "topic");
    seed(&m, &rows);
    let concurrency = 2;
    let job = store_job(&f, &s.base_url(), concurrency, "");
    let shard = |i: u32, work: &str| {
        let mut c = pod(&f, &m, work, &["run", "--quiet", &job, "--shards", "3"]);
        c.env("JOB_COMPLETION_INDEX", i.to_string());
        c.spawn().unwrap()
    };
    let mut pods: Vec<Child> = (0..3).map(|i| shard(i, &format!("pod-{i}"))).collect();

    // Pod 1 is killed once the store holds some of its pieces and it has answered more.
    let killed = "out/blog.shard-2-of-3.jsonl";
    let local = f.path("pod-1/out/s3/data/out/blog.shard-2-of-3.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines_in_pieces(&m, killed) < 20 || read_jsonl_lenient(&local) < 30 {
        assert!(Instant::now() < deadline, "pod 1 made no progress");
        std::thread::sleep(Duration::from_millis(25));
    }
    pods[1].kill().unwrap();
    pods[1].wait().unwrap();
    // What the dead pod had answered and what reached the store before it died.
    let answered = read_jsonl_lenient(&local);
    let checkpointed = lines_in_pieces(&m, killed);
    assert!(checkpointed <= answered);

    // Rescheduled on another node: an empty folder. It waits out the dead pod's lock.
    let mut again = shard(1, "pod-1-again");
    for (i, p) in pods.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert_eq!(wait(p, Duration::from_secs(120)), 0, "pod {i}");
    }
    assert_eq!(
        wait(&mut again, Duration::from_secs(120)),
        0,
        "the rescheduled pod"
    );

    let st = ran(pod(
        &f,
        &m,
        "ops",
        &["status", "s3://data/out/blog.shard-*.jsonl"],
    )
    .output()
    .unwrap());
    ok(&st);
    assert_eq!(
        st.stdout
            .lines()
            .filter(|l| l.contains("s3://data/out/blog.shard-"))
            .count(),
        3,
        "{}",
        st.stdout
    );

    let mg = ran(pod(
        &f,
        &m,
        "ops",
        &[
            "merge",
            "s3://data/out/blog.shard-*.jsonl",
            "-o",
            "s3://data/out/blog.jsonl",
        ],
    )
    .output()
    .unwrap());
    ok(&mg);
    let merged = m.records("data", "out/blog.jsonl");
    let mut seen: Vec<u64> = merged.iter().map(|r| r["row"].as_u64().unwrap()).collect();
    seen.sort();
    assert_eq!(
        seen,
        (1..=300).collect::<Vec<u64>>(),
        "every row once, in order"
    );
    assert!(merged.iter().all(|r| r["status"] == "ok"));
    // The stated bound: a dead pod re-pays at most what it answered since its last piece,
    // and the requests it had in flight.
    let billed = s.stats().requests as usize;
    let repaid = billed - merged.len();
    assert!(
        repaid <= answered - checkpointed + concurrency,
        "billed {billed}, kept {}, answered since the last piece {}",
        merged.len(),
        answered - checkpointed
    );
    assert!(m.list("data", "out/").iter().all(|k| !k.ends_with(".lock")));
    no_secret_in(&m.everything("data"), "the bucket");
}

/// A YAML file of the repository as JSON (PyYAML comes with moto).
fn yaml(rel: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let out = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_kubernetes_manifests_run_as_written() {
    let Some(m) = Moto::start() else { return };
    let s = server();
    let f = Fixture::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));

    let job = yaml("deploy/kubernetes/indexed-job.yaml");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let n = spec["completions"].as_u64().unwrap();
    assert_eq!(spec["parallelism"].as_u64(), Some(n));
    assert!(spec["backoffLimitPerIndex"].as_u64().is_some_and(|b| b > 0));
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    let args = strings(&c["args"]);
    let at = args.iter().position(|a| a == "--shards").unwrap();
    assert_eq!(args[at + 1], n.to_string(), "--shards N is the completions");
    let env = c["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).cloned();
    for secret in ["OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            var(secret).is_some_and(|e| e["valueFrom"]["secretKeyRef"].is_object()),
            "{secret} comes from a Secret"
        );
    }
    let work = var("PROMPTMILL_WORK_DIR").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount =
        |path: &str| mounts.iter().find(|v| v["mountPath"] == path).unwrap()["name"].clone();
    let volume = |name: &serde_json::Value| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == *name)
            .unwrap()
            .clone()
    };
    assert!(
        volume(&mount(&work))["emptyDir"].is_object(),
        "the work folder is the pod's own disk"
    );
    // The job file comes from the ConfigMap mounted where the args look for it.
    let job_arg = args.iter().find(|a| a.ends_with(".toml")).unwrap().clone();
    let job_dir = Path::new(&job_arg)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(volume(&mount(&job_dir))["configMap"].is_object());
    let job_file = repo
        .join("jobs")
        .join(Path::new(&job_arg).file_name().unwrap());
    assert!(job_file.is_file(), "{} is in jobs/", job_file.display());

    // The data the job names, put in the bucket it names.
    m.bucket("promptmill-data");
    m.put(
        "promptmill-data",
        "in/topics.csv",
        &std::fs::read(repo.join("jobs/data/topics.csv")).unwrap(),
    );
    for t in ["system_writer.tera", "blog_post.tera"] {
        m.put(
            "promptmill-data",
            &format!("templates/{t}"),
            &std::fs::read(repo.join("templates").join(t)).unwrap(),
        );
    }
    let rows = std::fs::read_to_string(repo.join("jobs/data/topics.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;

    // Every pod of the Indexed Job, each with its index and its own empty folder.
    let local_args: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == job_arg {
                job_file.to_str().unwrap().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let local_args: Vec<&str> = local_args.iter().map(String::as_str).collect();
    for i in 0..n {
        let mut c = f.cmd(&local_args);
        m.env(&mut c);
        c.env("OPENAI_BASE_URL", s.base_url())
            .env("JOB_COMPLETION_INDEX", i.to_string())
            .env("PROMPTMILL_WORK_DIR", f.path(&format!("pod-{i}")));
        let r = ran(c.output().unwrap());
        ok(&r);
    }
    assert_eq!(s.stats().requests as usize, rows);

    // Then the merge Job, its args as written.
    let merge = yaml("deploy/kubernetes/merge-job.yaml");
    let margs = strings(&merge["spec"]["template"]["spec"]["containers"][0]["args"]);
    let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    let mut c = f.cmd(&margs);
    m.env(&mut c);
    c.env("PROMPTMILL_WORK_DIR", f.path("merge-pod"));
    ok(&ran(c.output().unwrap()));
    let merged = m.records("promptmill-data", "out/blog.jsonl");
    let mut ids: Vec<String> = merged
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=rows).map(|i| format!("t{i}")).collect::<Vec<_>>());
    let keys = m.list("promptmill-data", "out/");
    assert!(keys.contains(&"out/blog.parquet".to_string()), "{keys:?}");
    assert!(keys.contains(&"out/blog.csv".to_string()), "{keys:?}");
    assert_eq!(s.stats().requests as usize, rows, "the merge sends nothing");
}

#[test]
fn the_store_client_follows_no_redirect_and_speaks_http_only_when_allowed() {
    // The other host: 127.0.0.2 is loopback too, but another origin.
    let other = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let other_addr = other.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for c in other.incoming().flatten().take(50) {
            seen2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(c);
        }
    });
    let endpoint = redirector(format!("http://{other_addr}/steal"));
    let s = server();
    let f = Fixture::new();
    let job = store_job(&f, &s.base_url(), 2, "");
    let r = ran(f
        .cmd(&["run", &job])
        .env("AWS_ENDPOINT_URL", &endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "AKIDTESTING")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("PROMPTMILL_WORK_DIR", f.path("pod"))
        .output()
        .unwrap());
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("s3://data/in/rows.csv"), "{}", r.stderr);
    no_secret_in(r.stderr.as_bytes(), "stderr");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a redirect was followed"
    );
    assert_eq!(s.stats().requests, 0);

    // Plain http only where AWS_ALLOW_HTTP says so: the same local store without it is refused.
    let Some(m) = Moto::start() else { return };
    seed(&m, &texts(2, "x"));
    let mut c = pod(&f, &m, "pod-2", &["run", &job]);
    c.env_remove("AWS_ALLOW_HTTP");
    let r = ran(c.output().unwrap());
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("s3://data/in/rows.csv"), "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A slow job (60 rows, two at a time at 100 ms) started on pod `work`, once its lock is taken.
fn slow_store_run(m: &Moto, f: &Fixture, s: &FakeServer, work: &str) -> Child {
    seed(m, &texts(60, "topic"));
    let job = store_job(f, &s.base_url(), 2, "");
    let child = pod(f, m, work, &["run", &job])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.list("data", "out/blog.jsonl.ckpt/").is_empty() {
        assert!(Instant::now() < deadline, "no checkpoint was made");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn sigterm_on_a_pod_publishes_what_it_has_and_nothing_is_paid_twice() {
    let Some(m) = Moto::start() else { return };
    let s = slow_server(100);
    let f = Fixture::new();
    let mut a = slow_store_run(&m, &f, &s, "pod-a");
    // A merge while the run holds its lock is refused.
    let mg = ran(pod(
        &f,
        &m,
        "ops",
        &[
            "merge",
            "s3://data/out/blog.jsonl",
            "-o",
            "s3://data/out/all.jsonl",
        ],
    )
    .output()
    .unwrap());
    assert_ne!(mg.code, 0, "{}", mg.stderr);
    assert!(mg.stderr.contains("lock"), "{}", mg.stderr);
    sigterm(&a);
    let code = wait(&mut a, Duration::from_secs(60));
    let a = ran(a.wait_with_output().unwrap());
    assert_eq!(code, 143, "{}", a.stderr);
    assert!(
        a.stderr.contains("published to s3://data/out/blog.jsonl"),
        "{}",
        a.stderr
    );
    let kept = m.records("data", "out/blog.jsonl").len();
    assert!(kept > 0 && kept < 60, "{kept}");
    assert_eq!(
        s.stats().requests as usize,
        kept,
        "the requests in flight were waited for"
    );
    assert!(!m
        .list("data", "out/")
        .contains(&"out/blog.jsonl.lock".to_string()));

    // Another pod finishes it: billed equals kept, every row once.
    ok(&ran(pod(&f, &m, "pod-b", &["run", "job.toml"])
        .output()
        .unwrap()));
    assert_eq!(m.records("data", "out/blog.jsonl").len(), 60);
    assert_eq!(s.stats().requests, 60);
}

#[test]
fn a_run_whose_lock_is_taken_over_stops_and_does_not_publish() {
    let Some(m) = Moto::start() else { return };
    let s = slow_server(100);
    let f = Fixture::new();
    let mut a = slow_store_run(&m, &f, &s, "pod-a");
    // Another run took it over (it thought this one dead).
    m.put(
        "data",
        "out/blog.jsonl.lock",
        br#"{"host":"other","pid":1}"#,
    );
    let code = wait(&mut a, Duration::from_secs(30));
    let a = ran(a.wait_with_output().unwrap());
    assert_ne!(code, 0, "{}", a.stderr);
    assert!(a.stderr.contains("took the lock over"), "{}", a.stderr);
    assert!(m.get("data", "out/blog.jsonl").is_none(), "it published");
    assert!(s.stats().requests < 60, "it stopped");
    // The other run's lock is left alone.
    assert_eq!(
        m.get("data", "out/blog.jsonl.lock").unwrap(),
        br#"{"host":"other","pid":1}"#.to_vec()
    );
}

#[test]
fn parquet_parts_in_a_bucket_folder_and_file_urls_are_read_like_local_files() {
    let Some(m) = Moto::start() else { return };
    let s = server();
    let f = Fixture::new();
    m.bucket("data");
    // A Hugging Face-style export: the part files of one dataset under a folder.
    let part =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/data/reviews.parquet"))
            .unwrap();
    m.put("data", "reviews/part-0.parquet", &part);
    m.put("data", "reviews/part-1.parquet", &part);
    m.put("data", "reviews/_SUCCESS", b"");
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "s3://data/reviews/"

[[messages]]
role = "user"
content = "Summarise: {{{{ review }}}} ({{{{ meta.lang }}}}, tags {{{{ tags | join(sep=', ') }}}})"

[model]
name = "gpt-4o-mini"
base_url = "{}"
max_tokens = 20

[output]
path = "s3://data/out/reviews.jsonl"
parquet = "s3://data/out/reviews.parquet"
"#,
            s.base_url()
        ),
    );
    let r = ran(pod(&f, &m, "pod", &["run", "job.toml"]).output().unwrap());
    ok(&r);
    // Two parts of the same five rows: ten rows, five requests (the second part's are copies).
    assert_eq!(s.stats().requests, 5, "{}", r.stderr);
    let rows: Vec<u64> = m
        .records("data", "out/reviews.jsonl")
        .iter()
        .map(|r| r["row"].as_u64().unwrap())
        .collect();
    assert_eq!(
        rows,
        (1..=10).collect::<Vec<_>>(),
        "rows numbered across the parts"
    );
    assert_eq!(&m.get("data", "out/reviews.parquet").unwrap()[..4], b"PAR1");

    // file:// is a local path: no working folder, no pieces.
    let abs = f.path("local");
    let data = f.write("local/rows.csv", csv_of(&texts(3, "row")));
    f.write(
        "file.toml",
        format!(
            "[input]\npath = \"file://{}\"\n[[messages]]\nrole = \"user\"\ncontent = \"{{{{ text }}}}\"\n\
             [model]\nname = \"gpt-4o-mini\"\nbase_url = \"{}\"\nmax_tokens = 5\n\
             [output]\npath = \"file://{}/out.jsonl\"\n",
            data.display(),
            s.base_url(),
            abs.display()
        ),
    );
    let r = ran(pod(&f, &m, "pod-f", &["run", "file.toml"])
        .output()
        .unwrap());
    ok(&r);
    assert_eq!(read_jsonl(&abs.join("out.jsonl")).len(), 3);
    assert!(
        !f.path("pod-f").exists(),
        "a file:// job needs no working folder"
    );
}

/// A bucket a test can fill and read without promptmill: Azurite's, or the fake GCS's.
trait Bucket {
    fn put(&self, key: &str, body: &[u8]);
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    fn keys(&self) -> Vec<String>;
}

struct AzureData<'a>(&'a crate::util::azure::Azurite);

impl Bucket for AzureData<'_> {
    fn put(&self, key: &str, body: &[u8]) {
        self.0.put("data", key, body)
    }
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.get("data", key)
    }
    fn keys(&self) -> Vec<String> {
        self.0.list("data")
    }
}

struct GcsData<'a>(&'a FakeServer);

impl Bucket for GcsData<'_> {
    fn put(&self, key: &str, body: &[u8]) {
        self.0.gcs_put("data", key, body)
    }
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.gcs_get("data", key)
    }
    fn keys(&self) -> Vec<String> {
        self.0.gcs_keys("data")
    }
}

/// The job on `SCHEME://data/…`: killed once some pieces are on the store, run again on an
/// empty folder (it takes the dead run's lock over through the store's conditional writes and
/// finishes, billed minus kept within the bound), then a fresh pod that sends nothing.
fn killed_and_resumed(b: &dyn Bucket, scheme: &str, s: &FakeServer, env: &dyn Fn(&mut Command)) {
    let f = Fixture::new();
    b.put("in/rows.csv", csv_of(&texts(80, "topic")).as_bytes());
    b.put(
        "templates/ask.tera",
        b"{% include \"part.tera\" %} {{ text }}",
    );
    b.put("templates/part.tera", b"Write about:");
    let job = store_job(&f, &s.base_url(), 2, "");
    let text = std::fs::read_to_string(f.path(&job))
        .unwrap()
        .replace("s3://", &format!("{scheme}://"));
    f.write(&job, text);
    let run = |work: &str| {
        let mut c = f.cmd(&["run", "--quiet", &job]);
        env(&mut c);
        c.env("PROMPTMILL_WORK_DIR", f.path(work));
        c
    };
    let mut a = run("pod-a").spawn().unwrap();
    let local = f.path(&format!("pod-a/out/{scheme}/data/out/blog.jsonl"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.keys().iter().any(|k| k.contains(".ckpt/")) || read_jsonl_lenient(&local) < 20 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.kill().unwrap();
    a.wait().unwrap();
    let answered = read_jsonl_lenient(&local);
    let checkpointed: usize = b
        .keys()
        .iter()
        .filter(|k| k.contains(".ckpt/"))
        .map(|k| {
            String::from_utf8(b.get(k).unwrap())
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    let r = ran(run("pod-b").output().unwrap());
    ok(&r);
    let kept = String::from_utf8(b.get("out/blog.jsonl").unwrap())
        .unwrap()
        .lines()
        .count();
    assert_eq!(kept, 80);
    let billed = s.stats().requests as usize;
    assert!(
        billed - kept <= answered - checkpointed + 2,
        "billed {billed}, kept {kept}, answered since the last piece {}",
        answered - checkpointed
    );
    assert!(
        !b.keys().iter().any(|k| k.ends_with(".lock")),
        "the lock is released"
    );
    ok(&ran(run("pod-c").output().unwrap()));
    assert_eq!(
        s.stats().requests as usize,
        billed,
        "a fresh pod sends nothing"
    );
}

#[test]
fn az_urls_run_resume_and_lock_on_azure_blob_storage() {
    let Some(az) = crate::util::azure::Azurite::start() else {
        return;
    };
    az.container("data");
    let s = slow_server(50);
    killed_and_resumed(&AzureData(&az), "az", &s, &|c| az.env(c));
}

#[test]
fn gs_urls_run_resume_and_lock_on_google_cloud_storage() {
    // The fake server speaks GCS's XML API too; a service-account file points the client at it.
    let s = slow_server(50);
    let dir = tempfile::tempdir().unwrap();
    let account = dir.path().join("account.json");
    std::fs::write(
        &account,
        serde_json::json!({"disable_oauth": true, "gcs_base_url": s.gcs_url(),
            "client_email": "", "private_key": "", "private_key_id": ""})
        .to_string(),
    )
    .unwrap();
    killed_and_resumed(&GcsData(&s), "gs", &s, &|c| {
        c.env("GOOGLE_SERVICE_ACCOUNT", &account);
    });
}

#[test]
fn fresh_on_a_store_output_keeps_the_old_records_when_the_pod_dies() {
    let Some(m) = Moto::start() else { return };
    let s = slow_server(100);
    let f = Fixture::new();
    seed(&m, &texts(30, "topic"));
    let job = store_job(&f, &s.base_url(), 2, "");
    ok(&ran(pod(&f, &m, "pod-a", &["run", "--quiet", &job])
        .output()
        .unwrap()));
    assert_eq!(m.records("data", "out/blog.jsonl").len(), 30);
    // `--fresh` moves those paid records to `.prev`; the pod dies after its first piece.
    let before: Vec<String> = m.list("data", "out/blog.jsonl.ckpt/");
    let mut b = pod(&f, &m, "pod-b", &["run", "--quiet", "--fresh", &job])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.list("data", "out/blog.jsonl.ckpt/") == before {
        assert!(Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill().unwrap();
    b.wait().unwrap();
    let prev = m.records("data", "out/blog.prev.jsonl");
    assert_eq!(
        prev.len(),
        30,
        "the paid records moved aside are on the store"
    );
}
