//! The HTML report, through the real binary against the fake server: a run with ok, failed
//! and hostile rows writes a report whose counts, rows, escaping and table cap are checked in
//! its text, then opened in headless Chromium (its DevTools protocol over a pipe) to check
//! that it renders with no console errors and no network request, that the status filter and
//! the search work, and that the injected script never ran.

use std::path::PathBuf;

use serde_json::Value;

use crate::util::*;

/// What the hostile row says: run as HTML, it would set the title and a global.
const HOSTILE: &str = r#"<script>document.title='pwned';window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">"#;

/// Eight rows: six ok (one hostile), two refused by the API (400).
fn rows() -> Vec<String> {
    vec![
        "alpha composting".into(),
        "FAULT:400 beta".into(),
        "gamma balconies".into(),
        HOSTILE.into(),
        "delta worms".into(),
        "FAULT:400 epsilon".into(),
        "zeta compost bins".into(),
        "eta leaf mould".into(),
    ]
}

/// Runs the eight rows through `promptmill run`; returns the fixture and the run's stderr.
fn run_job(server: &FakeServer, output_extra: &str) -> (Fixture, Ran) {
    let f = Fixture::new();
    let mut data = String::new();
    for r in rows() {
        data.push_str(&serde_json::json!({ "text": r }).to_string());
        data.push('\n');
    }
    f.write("data.jsonl", data);
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "data.jsonl"

[[messages]]
role = "user"
content = "{{{{ text }}}}"

[model]
name = "gpt-4o-mini"
base_url = "{}"
max_tokens = 200

[run]
concurrency = 2
max_retries = 1

[output]
path = "out/result.jsonl"
{output_extra}
"#,
            server.base_url()
        ),
    );
    let r = f.run(&["run", "job.toml"]);
    (f, r)
}

fn report_path(f: &Fixture) -> PathBuf {
    f.path("out/result.jsonl.report.html")
}

/// The JSON the report carries for tools (and for its own script).
fn report_data(html: &str) -> Value {
    let start = r#"<script type="application/json" id="report-data">"#;
    let i = html.find(start).expect("the report's data element") + start.len();
    let j = i + html[i..].find("</script>").unwrap();
    serde_json::from_str(&html[i..j]).unwrap()
}

/// Every tag's text (from `<` to `>`): model and input text is escaped, so a raw `<` can
/// only open a tag the report itself wrote.
fn tags(html: &str) -> Vec<&str> {
    html.split('<')
        .skip(1)
        .map(|s| &s[..s.find('>').unwrap_or(s.len())])
        .collect()
}

fn table_rows(html: &str, status: &str) -> usize {
    html.matches(&format!("<tr data-status=\"{status}\">"))
        .count()
}

#[test]
fn a_run_writes_a_report_with_every_row_escaped_and_nothing_to_load() {
    let s = spawn_background(Config::default());
    let (f, r) = run_job(&s, "");
    assert_eq!(r.code, 1, "two rows fail: {}", r.stderr);
    let path = report_path(&f);
    assert!(
        r.stderr.contains("report: ") && r.stderr.contains("result.jsonl.report.html"),
        "{}",
        r.stderr
    );
    let html = std::fs::read_to_string(&path).unwrap();

    // The summary: counts from the records, the last run from the summary file.
    let data = report_data(&html);
    assert_eq!(data["records"], 8);
    assert_eq!(data["ok"], 6);
    assert_eq!(data["failed"], 2);
    assert_eq!(data["summary"]["rows_ok"], 6);
    assert_eq!(data["summary"]["rows_failed"], 2);
    assert_eq!(data["table_rows"], 8);
    assert!(html.contains("<dt>ok</dt><dd>6</dd>"), "the summary card");
    assert!(html.contains("bad_request (HTTP 400)"), "errors by kind");
    for chart in [
        "Latency",
        "Completion tokens per row",
        "Cumulative cost",
        "Requests per minute",
        "Errors by kind",
    ] {
        assert!(html.contains(&format!("<b>{chart}</b>")), "{chart}");
    }
    assert!(html.matches("<svg ").count() >= 5);

    // Every row, with its completion (the fake server echoes the prompt).
    assert_eq!(table_rows(&html, "ok"), 6);
    assert_eq!(table_rows(&html, "failed"), 2);
    for t in rows()
        .iter()
        .filter(|t| !t.starts_with("FAULT") && *t != HOSTILE)
    {
        assert!(html.contains(&format!("echo: {t}")), "{t}");
    }
    assert!(html.contains("FAULT:400 beta") && html.contains("FAULT:400 epsilon"));

    // The hostile text is shown, as text: in the input cell and in the completion.
    let shown = "&lt;script&gt;document.title=&#39;pwned&#39;;window.__pwned=1&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=&quot;window.__pwned=2&quot;&gt;";
    assert_eq!(html.matches(shown).count(), 2, "input and completion");
    assert!(!html.contains("<img"));
    assert!(!html.contains("document.title='pwned'"));
    // The report's own two script elements, and no other.
    let scripts: Vec<&str> = tags(&html)
        .into_iter()
        .filter(|t| t.starts_with("script"))
        .collect();
    assert_eq!(
        scripts,
        vec![
            r#"script type="application/json" id="report-data""#,
            "script"
        ]
    );

    // Self-contained: no URL to load anything from, no attribute that would load anything.
    assert!(!html.contains("http://") && !html.contains("https://"));
    for t in tags(&html) {
        for attr in ["src=", "href=", "url(", "@import"] {
            assert!(!t.contains(attr), "<{t}>");
        }
    }
    assert!(html.contains("Content-Security-Policy"));
}

#[test]
fn the_report_command_caps_the_table_and_keeps_every_failed_row() {
    let s = spawn_background(Config::default());
    let (f, r) = run_job(&s, "");
    assert_eq!(r.code, 1, "{}", r.stderr);
    // Without the summary file, the report is made from the records alone.
    std::fs::remove_file(f.path("out/result.jsonl.summary.json")).unwrap();
    let r = f.run(&[
        "report",
        "out/result.jsonl",
        "--rows",
        "2",
        "-o",
        "capped.html",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "capped.html");
    let html = std::fs::read_to_string(f.path("capped.html")).unwrap();
    // Rows 1 and 2 (the first failed), then row 6, the other failed one.
    assert_eq!(table_rows(&html, "ok"), 1);
    assert_eq!(table_rows(&html, "failed"), 2);
    assert!(html.contains("echo: alpha composting"));
    assert!(!html.contains("echo: gamma balconies"));
    assert!(html.contains("FAULT:400 epsilon"));
    assert!(html.contains("The table holds the first 2 records and every failed one: 3 of 8"));
    // The charts still cover all eight rows.
    let data = report_data(&html);
    assert_eq!(data["records"], 8);
    assert_eq!(data["table_rows"], 3);
    assert!(data["summary"].is_null());
    assert!(html.contains("no summary file: from the records"));
    assert!(html.contains("8 rows that sent a request"));

    // The report is never written over the output.
    let before = std::fs::read(f.path("out/result.jsonl")).unwrap();
    let r = f.run(&[
        "report",
        "out/result.jsonl",
        "-o",
        "out/../out/result.jsonl",
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("overwrite the output"), "{}", r.stderr);
    assert_eq!(std::fs::read(f.path("out/result.jsonl")).unwrap(), before);

    // An output that is not there is an error, with its path.
    let r = f.run(&["report", "out/nothing.jsonl"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("out/nothing.jsonl"), "{}", r.stderr);
}

#[test]
fn report_false_writes_none_and_a_report_that_cannot_be_written_keeps_the_exit_code() {
    let s = spawn_background(Config::default());
    let (f, r) = run_job(&s, "report = false");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!report_path(&f).exists());
    assert!(!r.stderr.contains("report: "), "{}", r.stderr);

    // The report's path is a folder: the run warns, and its outcome stands.
    let (f, _) = run_job(&s, "");
    std::fs::remove_file(report_path(&f)).unwrap();
    std::fs::create_dir(report_path(&f)).unwrap();
    let r = f.run(&["run", "--fresh", "job.toml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot write the report"), "{}", r.stderr);
    assert_eq!(f.records().len(), 8);
    assert!(!f.path("out/result.jsonl.report.html.tmp").exists());
    assert!(!f.path("out/result.jsonl.report.html.rows.tmp").exists());
}

#[test]
fn failed_rows_past_their_cap_are_counted_not_shown() {
    let s = spawn_background(Config::default());
    let (f, r) = run_job(&s, "report_rows = 1\nreport_failed_rows = 1");
    assert_eq!(r.code, 1, "{}", r.stderr);
    let html = std::fs::read_to_string(report_path(&f)).unwrap();
    // Row 1, then row 2 (the first failed); row 6 fails too and is only counted.
    assert_eq!(table_rows(&html, "ok"), 1);
    assert_eq!(table_rows(&html, "failed"), 1);
    assert!(!html.contains("FAULT:400 epsilon"));
    assert!(
        html.contains("<strong>1 more failed rows are not in the table</strong>"),
        "{html}"
    );
    assert_eq!(report_data(&html)["failed_left"], 1);
    // The command's --failed-rows raises the cap.
    let r = f.run(&[
        "report",
        "out/result.jsonl",
        "--rows",
        "1",
        "--failed-rows",
        "5",
        "-o",
        "all.html",
    ]);
    ok(&r);
    let html = std::fs::read_to_string(f.path("all.html")).unwrap();
    assert_eq!(table_rows(&html, "failed"), 2);
    assert_eq!(report_data(&html)["failed_left"], 0);
    // No failed row past the first: the command says how many it left out.
    let r = f.run(&[
        "report",
        "out/result.jsonl",
        "--rows",
        "0",
        "--failed-rows",
        "0",
        "-o",
        "none.html",
    ]);
    ok(&r);
    assert!(
        r.stderr.contains("2 more failed rows left out"),
        "{}",
        r.stderr
    );
}

#[test]
fn twenty_thousand_failed_rows_make_a_page_of_the_caps_size() {
    let f = Fixture::new();
    let mut out = String::new();
    for i in 1..=20_000 {
        out.push_str(&format!(
            "{{\"row\":{i},\"id\":\"{i}\",\"status\":\"error\",\"input\":{{\"text\":\"row {i} with some words to show\"}},\"error\":{{\"kind\":\"bad_request\",\"status\":400,\"message\":\"This model's maximum context length is 128000 tokens.\"}},\"attempts\":1,\"latency_ms\":5}}\n"
        ));
    }
    f.write("out/result.jsonl", out);
    let r = f.run(&["report", "out/result.jsonl", "-o", "big.html"]);
    ok(&r);
    let html = std::fs::read_to_string(f.path("big.html")).unwrap();
    // The first 1,000 rows and 1,000 failed ones after them.
    assert_eq!(table_rows(&html, "failed"), 2000);
    let data = report_data(&html);
    assert_eq!(data["failed_left"], 18_000);
    assert_eq!(data["records"], 20_000);
    assert!(html.len() < 2_000_000, "{} bytes", html.len());
}

#[test]
fn report_rows_in_the_job_sets_the_table_size() {
    let s = spawn_background(Config::default());
    let (f, r) = run_job(&s, "report_rows = 0");
    assert_eq!(r.code, 1, "{}", r.stderr);
    let html = std::fs::read_to_string(report_path(&f)).unwrap();
    assert_eq!(table_rows(&html, "ok"), 0);
    assert_eq!(
        table_rows(&html, "failed"),
        2,
        "failed rows are always there"
    );
}

/// The report in a real browser: headless Chromium, driven over its DevTools protocol.
#[test]
fn the_report_renders_filters_and_never_runs_the_injected_script_in_chromium() {
    let Some(chromium) = browser::find() else {
        // In CI a missing browser is a failure: .ci/run installs it.
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true and no Chromium at /usr/bin/chromium (or $PROMPTMILL_CHROMIUM): \
             scripts/setup-debian.sh --test installs Debian's `chromium`"
        );
        eprintln!(
            "SKIPPED the_report_renders_filters_and_never_runs_the_injected_script_in_chromium: \
             no Chromium at /usr/bin/chromium (or $PROMPTMILL_CHROMIUM); install Debian's \
             `chromium` package (scripts/setup-debian.sh does, for scripts/test.sh)"
        );
        return;
    };
    let s = spawn_background(Config::default());
    let (f, r) = run_job(&s, "");
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = report_path(&f).canonicalize().unwrap();

    let mut b = browser::Browser::launch(&chromium, &f.path("chromium"));
    b.open(&format!("file://{}", report.display()));

    let title = b.eval("document.title");
    assert_eq!(title, "result.jsonl · promptmill report");
    assert_eq!(b.eval("typeof window.__pwned"), "undefined");
    // The page's script ran: it counts the rows it shows.
    assert_eq!(
        b.eval("document.getElementById('shown').textContent"),
        "8 of 8 table rows shown"
    );
    // The hostile row is on the page as text.
    assert_eq!(
        b.eval("[...document.querySelectorAll('td.out .text')].some(e => e.textContent.includes(\"<script>document.title='pwned'\"))"),
        true
    );

    // "failed": only the failed rows are rendered.
    let visible = "[...document.querySelectorAll('#rows tbody tr')].filter(r => r.offsetParent !== null).map(r => r.dataset.status + ' ' + r.cells[0].textContent)";
    b.eval(
        "(() => { const s = document.getElementById('status'); s.value = 'failed'; \
         s.dispatchEvent(new Event('change')); })()",
    );
    assert_eq!(b.eval(visible), serde_json::json!(["failed 2", "failed 6"]));
    assert_eq!(
        b.eval("document.getElementById('shown').textContent"),
        "2 of 8 table rows shown"
    );
    // "ok" and a search: the rows that hold the text.
    b.eval(
        "(() => { const s = document.getElementById('status'); s.value = 'ok'; \
         s.dispatchEvent(new Event('change')); const q = document.getElementById('q'); \
         q.value = 'COMPOST'; q.dispatchEvent(new Event('input')); })()",
    );
    assert_eq!(b.eval(visible), serde_json::json!(["ok 1", "ok 7"]));
    b.eval(
        "(() => { const s = document.getElementById('status'); s.value = 'all'; \
         s.dispatchEvent(new Event('change')); const q = document.getElementById('q'); \
         q.value = ''; q.dispatchEvent(new Event('input')); })()",
    );
    assert_eq!(b.eval(&format!("{visible}.length")), 8);

    let png = b.screenshot();
    let shot = f.path("report.png");
    std::fs::write(&shot, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(png.len() > 10_000, "a rendered page, {} bytes", png.len());

    let (errors, requests) = b.close();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    assert!(
        requests.iter().all(|u| u.starts_with("file://")),
        "the page loaded something: {requests:?}"
    );
    assert_eq!(title, "result.jsonl · promptmill report");
    eprintln!("screenshot: {}", shot.display());
}

/// A minimal DevTools-protocol client over `--remote-debugging-pipe` (JSON messages ending in
/// NUL, Chromium reading fd 3 and writing fd 4): no WebSocket, no extra dependency.
mod browser {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc::{Receiver, RecvTimeoutError};
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};

    /// How long one protocol call may take.
    const WAIT: Duration = Duration::from_secs(60);

    pub fn find() -> Option<PathBuf> {
        let p = std::env::var_os("PROMPTMILL_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
        p.is_file().then_some(p)
    }

    pub struct Browser {
        child: Child,
        to: File,
        from: Receiver<Value>,
        next_id: u64,
        session: String,
        events: Vec<Value>,
        stderr: PathBuf,
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills both descriptors, which nothing else owns.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptors from pipe2, owned here from now on.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    impl Browser {
        pub fn launch(chromium: &Path, profile: &Path) -> Browser {
            std::fs::create_dir_all(profile).unwrap();
            let (cmd_read, cmd_write) = pipe();
            let (out_read, out_write) = pipe();
            let stderr = profile.join("stderr.txt");
            let mut c = Command::new(chromium);
            c.args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-pipe",
                "--window-size=1280,1600",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
            let (r, w) = (
                std::os::fd::AsRawFd::as_raw_fd(&cmd_read),
                std::os::fd::AsRawFd::as_raw_fd(&out_write),
            );
            // SAFETY: only async-signal-safe calls between fork and exec. The pipe ends are
            // first copied above 10 so that placing them at 3 and 4 cannot clobber each other.
            unsafe {
                c.pre_exec(move || {
                    let a = libc::fcntl(r, libc::F_DUPFD, 10);
                    let b = libc::fcntl(w, libc::F_DUPFD, 10);
                    if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = c.spawn().expect("start chromium");
            drop((cmd_read, out_write));
            let (tx, from) = std::sync::mpsc::channel();
            let mut reader = File::from(out_read);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 64 * 1024];
                while let Ok(n) = reader.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.iter().position(|&b| b == 0) {
                        let msg: Vec<u8> = buf.drain(..=end).collect();
                        if let Ok(v) = serde_json::from_slice(&msg[..end]) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let mut b = Browser {
                child,
                to: File::from(cmd_write),
                from,
                next_id: 0,
                session: String::new(),
                events: Vec::new(),
                stderr,
            };
            let target = b.call("Target.createTarget", json!({"url": "about:blank"}), false);
            let target = target["targetId"].as_str().unwrap().to_string();
            let attached = b.call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
                false,
            );
            b.session = attached["sessionId"].as_str().unwrap().to_string();
            for domain in ["Page", "Runtime", "Log", "Network"] {
                b.call(&format!("{domain}.enable"), json!({}), true);
            }
            b
        }

        fn call(&mut self, method: &str, params: Value, in_page: bool) -> Value {
            self.next_id += 1;
            let id = self.next_id;
            let mut msg = json!({"id": id, "method": method, "params": params});
            if in_page {
                msg["sessionId"] = json!(self.session);
            }
            let mut bytes = serde_json::to_vec(&msg).unwrap();
            bytes.push(0);
            self.to.write_all(&bytes).unwrap();
            let deadline = Instant::now() + WAIT;
            loop {
                let v = self.next_message(deadline, method);
                if v["id"] == id {
                    if let Some(e) = v.get("error") {
                        panic!("{method}: {e}");
                    }
                    return v["result"].clone();
                }
                self.events.push(v);
            }
        }

        fn next_message(&mut self, deadline: Instant, waiting_for: &str) -> Value {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from.recv_timeout(left) {
                Ok(v) => v,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("chromium did not answer {waiting_for} in {WAIT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "chromium went away while waiting for {waiting_for}: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                ),
            }
        }

        /// Navigates and waits for the load event.
        pub fn open(&mut self, url: &str) {
            let seen = self.events.len();
            self.call("Page.navigate", json!({"url": url}), true);
            if self.events[seen..]
                .iter()
                .any(|e| e["method"] == "Page.loadEventFired")
            {
                return;
            }
            let deadline = Instant::now() + WAIT;
            loop {
                let v = self.next_message(deadline, "Page.loadEventFired");
                let loaded = v["method"] == "Page.loadEventFired";
                self.events.push(v);
                if loaded {
                    return;
                }
            }
        }

        /// Evaluates an expression in the page; returns its value.
        pub fn eval(&mut self, expression: &str) -> Value {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
                true,
            );
            if let Some(e) = r.get("exceptionDetails") {
                panic!("{expression}: {e}");
            }
            r["result"]["value"].clone()
        }

        pub fn screenshot(&mut self) -> Vec<u8> {
            let r = self.call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
                true,
            );
            base64_decode(r["data"].as_str().unwrap())
        }

        /// Closes the browser; returns the page's console errors and exceptions (a blocked
        /// script or load is one: Chromium logs CSP violations as errors), and every URL it
        /// requested. Warnings are left out: they vary between Chromium versions.
        pub fn close(mut self) -> (Vec<Value>, Vec<String>) {
            // Ask it to close, then keep every message until it has gone.
            self.next_id += 1;
            let mut bytes =
                serde_json::to_vec(&json!({"id": self.next_id, "method": "Browser.close"}))
                    .unwrap();
            bytes.push(0);
            let _ = self.to.write_all(&bytes);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.from.recv_timeout(left) {
                    Ok(v) => self.events.push(v),
                    Err(_) => break,
                }
            }
            let errors = self
                .events
                .iter()
                .filter(|e| {
                    let p = &e["params"];
                    match e["method"].as_str() {
                        Some("Runtime.exceptionThrown") => true,
                        Some("Runtime.consoleAPICalled") => {
                            matches!(p["type"].as_str(), Some("error" | "assert"))
                        }
                        Some("Log.entryAdded") => p["entry"]["level"] == "error",
                        _ => false,
                    }
                })
                .cloned()
                .collect();
            let requests = self
                .events
                .iter()
                .filter(|e| e["method"] == "Network.requestWillBeSent")
                .filter_map(|e| e["params"]["request"]["url"].as_str().map(String::from))
                .collect();
            (errors, requests)
        }
    }

    impl Drop for Browser {
        fn drop(&mut self) {
            // The child this test started, by its own handle.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        };
        let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for c in bytes.chunks(4) {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &v)| n | (u32::from(v) << (18 - 6 * i)));
            for i in 0..c.len() - 1 {
                out.push((n >> (16 - 8 * i)) as u8);
            }
        }
        out
    }
}
