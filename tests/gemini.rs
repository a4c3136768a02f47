//! `provider = "gemini"` through the real binary against the fake server's Gemini API: the
//! request as generateContent takes it, plain and streamed, usage priced to the table (the
//! implicit cache's reads at the cache-read rate), the schema as `responseJsonSchema`, several
//! candidates, the error table (retry with `RetryInfo`, stop on a bad key, refusals), the dry
//! run's estimate, the budget, and the Batch API with a kill between every step. Every test
//! counts what the server billed against what the output kept.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::util::*;

/// A system instruction every row shares, long enough for the fake's implicit cache (1,024
/// tokens of four characters).
fn long_rules() -> String {
    "Write in plain words, one short sentence, no lists. ".repeat(90)
}

/// gemini-2.5-flash per 1M tokens: input, cache read, output; batch is half of each.
const FLASH: (f64, f64, f64) = (0.30, 0.03, 2.50);

fn cost_of(u: &Value, half: bool) -> f64 {
    let n = |k: &str| u[k].as_f64().unwrap_or(0.0);
    let read = n("cached_tokens");
    let k = if half { 0.5 } else { 1.0 };
    k * ((n("prompt_tokens") - read) * FLASH.0 + read * FLASH.1 + n("completion_tokens") * FLASH.2)
        / 1e6
}

/// A Gemini job over `rows` (a `text` column); `model`, `run` and `output` go in their tables.
fn gemini_job(
    f: &Fixture,
    s: &FakeServer,
    rows: &[&str],
    system: &str,
    model: &str,
    run: &str,
    output: &str,
) -> String {
    let mut csv = String::from("text\n");
    for r in rows {
        csv.push_str(r);
        csv.push('\n');
    }
    f.write("data.csv", csv);
    let p = f.write(
        "gemini.toml",
        format!(
            r#"
[input]
path = "data.csv"

[[messages]]
role = "system"
content = "{system}"

[[messages]]
role = "user"
content = "Say it about {{{{ text }}}}"

[model]
provider = "gemini"
name = "gemini-2.5-flash"
base_url = "{base}"
max_tokens = 200
{model}

[run]
concurrency = 1
max_retries = 4
timeout_s = 5
{run}

[output]
path = "out/result.jsonl"
csv = "out/result.csv"
{output}

[batch]
poll_s = 0.05
"#,
            base = s.root_url(),
        ),
    );
    p.to_str().unwrap().to_string()
}

fn run(f: &Fixture, args: &[&str]) -> Ran {
    ran(f
        .cmd(args)
        .env("GEMINI_API_KEY", KEY)
        .env_remove("GOOGLE_API_KEY")
        .env_remove("GEMINI_BASE_URL")
        .output()
        .unwrap())
}

fn run_ok(f: &Fixture, args: &[&str]) -> Ran {
    let r = run(f, args);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    r
}

fn records(f: &Fixture) -> Vec<Value> {
    read_jsonl(&f.path("out/result.jsonl"))
}

fn billed_equals_kept(s: &FakeServer, f: &Fixture) {
    let st = s.stats();
    let recs = read_jsonl_if_there(&f.path("out/result.jsonl"));
    let sum = |k: &str| -> u64 {
        recs.iter()
            .map(|r| r["usage"][k].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        (st.billed_prompt_tokens, st.billed_completion_tokens),
        (sum("prompt_tokens"), sum("completion_tokens")),
        "billed vs kept"
    );
}

fn by<'a>(recs: &'a [Value], text: &str) -> &'a Value {
    recs.iter()
        .find(|r| r["input"]["text"].as_str().unwrap().starts_with(text))
        .unwrap_or_else(|| panic!("no record for {text}"))
}

#[test]
fn a_gemini_job_sends_generate_content_and_prices_every_token_with_implicit_cache_reads() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Default::default()
    });
    let f = Fixture::new();
    let j = gemini_job(
        &f,
        &s,
        &["boots", "hats", "socks"],
        &long_rules(),
        "temperature = 0.2\nstop = [\"END\"]\nseed = 3\nextra = { topK = 5 }",
        "",
        "",
    );
    let ran = run_ok(&f, &["run", "--quiet", &j]);
    let body = &s.requests()[0];
    assert_eq!(body["systemInstruction"]["parts"][0]["text"], long_rules());
    assert_eq!(body["contents"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["contents"][0]["role"], "user");
    assert_eq!(
        body["contents"][0]["parts"][0]["text"],
        "Say it about boots"
    );
    let g = &body["generationConfig"];
    assert_eq!(g["maxOutputTokens"], 200);
    assert_eq!(g["temperature"], 0.2);
    assert_eq!(g["stopSequences"], serde_json::json!(["END"]));
    assert_eq!(g["seed"], 3);
    assert_eq!(
        g["topK"], 5,
        "extra's generationConfig field goes inside it"
    );
    assert!(body.get("model").is_none() && body.get("messages").is_none());

    let recs = records(&f);
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    assert_eq!(recs[0]["completion"], "echo: Say it about boots");
    assert_eq!(recs[0]["model"], "gemini-2.5-flash");
    // The first row fills the implicit cache; the next ones read the shared instruction.
    assert!(recs[0]["usage"].get("cached_tokens").is_none_or(|c| c == 0));
    let cached = recs[1]["usage"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 1024, "{}", recs[1]);
    assert_eq!(recs[2]["usage"]["cached_tokens"].as_u64(), Some(cached));
    for r in &recs {
        let got = r["cost_usd"].as_f64().unwrap();
        assert!(
            (got - cost_of(&r["usage"], false)).abs() < 1e-12,
            "{got} for {r}"
        );
    }
    assert!(recs[1]["cost_usd"].as_f64() < recs[0]["cost_usd"].as_f64());
    billed_equals_kept(&s, &f);
    // The key: sent in its header, never anywhere the run writes.
    for entry in walk(f.dir.path()) {
        let text = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&text).contains(KEY),
            "{}",
            entry.display()
        );
    }
    assert!(!ran.stderr.contains(KEY));
}

#[test]
fn a_streamed_gemini_job_adds_up_its_chunks_and_a_cut_stream_is_sent_again() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = gemini_job(
        &f,
        &s,
        &["boots", "hats FAULT:cut:1"],
        "Be brief.",
        "stream = true",
        "",
        "",
    );
    run_ok(&f, &["run", "--quiet", &j]);
    let recs = records(&f);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    for r in &recs {
        let input = r["input"]["text"].as_str().unwrap();
        assert_eq!(
            r["completion"].as_str().unwrap(),
            format!("echo: Say it about {input}")
        );
        assert!(r["ttft_ms"].is_u64(), "{r}");
        let got = r["cost_usd"].as_f64().unwrap();
        assert!((got - cost_of(&r["usage"], false)).abs() < 1e-12, "{r}");
    }
    let hats = by(&recs, "hats");
    assert_eq!(hats["attempts"], 2, "{hats}");
    assert_eq!(s.stats().requests, 3);
    // The cut stream was billed and is not kept: billed = kept + that one answer.
    let st = s.stats();
    let kept = |k: &str| {
        recs.iter()
            .map(|r| r["usage"][k].as_u64().unwrap())
            .sum::<u64>()
    };
    let cut = |k: &str| hats["usage"][k].as_u64().unwrap();
    assert_eq!(
        (st.billed_prompt_tokens, st.billed_completion_tokens),
        (
            kept("prompt_tokens") + cut("prompt_tokens"),
            kept("completion_tokens") + cut("completion_tokens")
        )
    );
}

#[test]
fn a_schema_goes_out_as_response_json_schema_and_its_fields_become_columns() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write(
        "schemas/ad.json",
        r#"{"type": "object", "properties": {"headline": {"type": "string", "maxLength": 30},
            "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["headline", "tags"], "additionalProperties": false}"#,
    );
    let j = gemini_job(
        &f,
        &s,
        &["boots", "hats"],
        "Be brief.",
        "",
        "",
        "schema = \"schemas/ad.json\"",
    );
    run_ok(&f, &["run", "--quiet", &j]);
    let g = &s.requests()[0]["generationConfig"];
    assert_eq!(g["responseMimeType"], "application/json");
    assert_eq!(
        g["responseJsonSchema"]["properties"]["headline"]["maxLength"],
        30
    );
    let recs = records(&f);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    assert!(recs[0]["data"]["headline"].is_string(), "{}", recs[0]);
    let mut rdr = csv::Reader::from_path(f.path("out/result.csv")).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert!(header.iter().any(|h| h == "headline") && header.iter().any(|h| h == "tags"));
    billed_equals_kept(&s, &f);
}

#[test]
fn n_candidates_are_n_choices_from_one_request() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = gemini_job(&f, &s, &["boots", "hats"], "Be brief.", "n = 3", "", "");
    run_ok(&f, &["run", "--quiet", &j]);
    assert_eq!(s.stats().requests, 2, "one request a row");
    assert_eq!(s.requests()[0]["generationConfig"]["candidateCount"], 3);
    let recs = records(&f);
    let texts: BTreeSet<String> = recs
        .iter()
        .flat_map(|r| {
            let v = r["variants"].as_array().cloned().unwrap_or_default();
            assert_eq!(v.len(), 3, "{r}");
            v.into_iter()
                .map(|v| v["completion"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert!(texts.contains("echo: Say it about boots #3"), "{texts:?}");
    billed_equals_kept(&s, &f);
    // Streamed, each candidate's chunks add up by its index.
    let s2 = spawn_background(Config::default());
    let f2 = Fixture::new();
    let j2 = gemini_job(
        &f2,
        &s2,
        &["boots"],
        "Be brief.",
        "n = 2\nstream = true",
        "",
        "",
    );
    run_ok(&f2, &["run", "--quiet", &j2]);
    let v = records(&f2)[0]["variants"].as_array().cloned().unwrap();
    assert_eq!(v[0]["completion"], "echo: Say it about boots");
    assert_eq!(v[1]["completion"], "echo: Say it about boots #2");
    billed_equals_kept(&s2, &f2);
    // More than Gemini's 8 candidates is refused where the job loads.
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("n = 3", "n = 9");
    std::fs::write(&j, text).unwrap();
    let r = run(&f, &["validate", &j]);
    assert!(r.code != 0 && r.stderr.contains("model.n"), "{}", r.stderr);
}

#[test]
fn rate_limits_and_unavailable_are_retried_and_blocked_answers_are_refusals() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = gemini_job(
        &f,
        &s,
        &[
            "one FAULT:429:2",
            "two FAULT:503:1",
            "three FAULT:500:1",
            "four FAULT:400",
            "five FAULT:refusal",
            "six FAULT:blockprompt",
        ],
        "Be brief.",
        "",
        "",
        // A refusal is judged where the job has a shape: a check makes one.
        "checks = { max_chars = 500 }",
    );
    let t0 = std::time::Instant::now();
    let r = run(&f, &["run", "--quiet", &j]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    // Two 429s, each asking for 1s in its RetryInfo: the run waited for them.
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    let recs = records(&f);
    for t in ["one", "two", "three"] {
        assert_eq!(by(&recs, t)["status"], "ok", "{}", by(&recs, t));
    }
    assert_eq!(by(&recs, "one")["attempts"], 3);
    let four = by(&recs, "four");
    assert_eq!(four["error"]["kind"], "bad_request", "{four}");
    assert!(four["error"]["message"]
        .as_str()
        .unwrap()
        .contains("INVALID_ARGUMENT"));
    for t in ["five", "six"] {
        let r = by(&recs, t);
        assert_eq!(r["error"]["kind"], "refusal", "{r}");
        assert_eq!(r["attempts"], 1, "a refusal is not retried: {r}");
    }
    assert!(by(&recs, "six")["error"]["message"]
        .as_str()
        .unwrap()
        .contains("blockReason"));
    // 2 + 1 + 1 faults then an answer each; the 400 and the two refusals once.
    assert_eq!(s.stats().requests, 3 + 2 + 2 + 1 + 1 + 1);
    billed_equals_kept(&s, &f);
}

#[test]
fn a_wrong_key_or_a_forbidden_one_stops_the_job_and_a_rerun_finishes_once() {
    let s = spawn_background(Config {
        require_key: Some("right-key".into()),
        ..Default::default()
    });
    let f = Fixture::new();
    let j = gemini_job(&f, &s, &["a", "b", "c"], "Be brief.", "", "", "");
    let r = run(&f, &["run", "--quiet", &j]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("API key not valid"), "{}", r.stderr);
    assert_eq!(s.stats().requests, 1, "the job stopped at the first answer");
    assert!(read_jsonl_if_there(&f.path("out/result.jsonl")).is_empty());
    // GOOGLE_API_KEY stands in when GEMINI_API_KEY is not set.
    let r = ran(f
        .cmd(&["run", "--quiet", &j])
        .env_remove("GEMINI_API_KEY")
        .env("GOOGLE_API_KEY", "right-key")
        .output()
        .unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(records(&f).len(), 3);
    assert_eq!(s.stats().ok, 3, "every row answered once");
    billed_equals_kept(&s, &f);

    // A daily quota spent (a 429 whose QuotaFailure names a per-day quota) stops it too.
    for (marker, status) in [
        ("FAULT:401", "UNAUTHENTICATED"),
        ("FAULT:403", "PERMISSION_DENIED"),
        ("FAULT:quota", "RESOURCE_EXHAUSTED"),
    ] {
        let s = spawn_background(Config::default());
        let f = Fixture::new();
        let j = gemini_job(
            &f,
            &s,
            &[&format!("x {marker}"), "y"],
            "Be brief.",
            "",
            "",
            "",
        );
        let r = run(&f, &["run", "--quiet", &j]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(status), "{}", r.stderr);
        assert_eq!(
            s.stats().requests,
            1,
            "{marker}: not retried, and no row after it sent"
        );
        assert_eq!(s.stats().billed_prompt_tokens, 0);
    }
}

#[test]
fn the_dry_run_marks_geminis_counts_as_estimates() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = gemini_job(
        &f,
        &s,
        &["boots", "hats", "socks"],
        &long_rules(),
        "",
        "",
        "",
    );
    let r = run_ok(&f, &["estimate", &j]);
    assert!(r.stdout.contains("tokenizer is not public"), "{}", r.stdout);
    assert!(r.stdout.contains("× 1.25"), "{}", r.stdout);
    assert!(r.stdout.contains("may save up to"), "{}", r.stdout);
    let bound = r
        .stdout
        .lines()
        .find(|l| l.starts_with("cost bound"))
        .unwrap();
    assert!(!bound.contains("unknown"), "{bound}");
    assert_eq!(s.stats().requests, 0);
    // An unknown model with no [pricing] is refused before anything is sent.
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("gemini-2.5-flash", "gemini-9-ultra")
        .replace("[run]\n", "[run]\nmax_cost_usd = 1.0\n");
    std::fs::write(&j, text).unwrap();
    let r = run(&f, &["run", "--quiet", &j]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn the_budget_holds_across_runs_at_geminis_prices() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows: Vec<String> = (0..12).map(|i| format!("row {i}")).collect();
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    // A system instruction under the fake's cache minimum (about 780 tokens), 100 tokens out
    // at most: a row's worst case is about $0.0005 and it costs about $0.0003, so $0.002 pays
    // for a few rows and not for twelve.
    let rules = "Write in plain words, one short sentence, no lists. ".repeat(60);
    let j = gemini_job(&f, &s, &rows, &rules, "", "max_cost_usd = 0.002", "");
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("max_tokens = 200", "max_tokens = 100");
    std::fs::write(&j, text).unwrap();
    budget_holds_across_runs(&s, &f, 0.002, 12, || run(&f, &["run", "--quiet", &j]));
    billed_equals_kept(&s, &f);
}

#[test]
fn a_job_with_what_gemini_has_no_field_for_is_refused_by_field() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = gemini_job(&f, &s, &["a"], "Be brief.", "", "", "");
    let text = std::fs::read_to_string(&j).unwrap();
    for (add, field) in [
        ("service_tier = \"flex\"", "model.service_tier"),
        ("user = \"u1\"", "model.user"),
        ("prompt_cache = \"1h\"", "model.prompt_cache"),
    ] {
        std::fs::write(
            &j,
            text.replace("max_tokens = 200\n", &format!("max_tokens = 200\n{add}\n")),
        )
        .unwrap();
        let r = run(&f, &["validate", &j]);
        assert_ne!(r.code, 0, "{field}");
        assert!(r.stderr.contains(field), "{field}: {}", r.stderr);
    }
    // max_tokens is optional for Gemini.
    std::fs::write(&j, text.replace("max_tokens = 200\n", "")).unwrap();
    run_ok(&f, &["validate", &j]);
    assert_eq!(s.stats().requests, 0);
}

// ---------------------------------------------------------------------------------------
// The Batch API

fn batch_rows(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("item {i}")).collect()
}

fn batch_job(f: &Fixture, s: &FakeServer, rows: &[String], batch: &str) -> String {
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let j = gemini_job(f, s, &rows, "Be brief.", "", "mode = \"batch\"", "");
    let text = std::fs::read_to_string(&j).unwrap();
    std::fs::write(&j, format!("{text}{batch}\n")).unwrap();
    j
}

fn ok_completions(f: &Fixture) -> BTreeSet<String> {
    read_jsonl_if_there(&f.path("out/result.jsonl"))
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| r["completion"].as_str().unwrap().to_string())
        .collect()
}

fn echo_all(rows: &[String]) -> BTreeSet<String> {
    rows.iter()
        .map(|t| format!("echo: Say it about {t}"))
        .collect()
}

#[test]
fn a_gemini_batch_is_uploaded_created_waited_for_and_collected_at_half_price() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = batch_rows(7);
    let j = batch_job(&f, &s, &rows, "");
    // The dry run sizes the file with Gemini's lines: the bytes it says are the bytes sent.
    let dry = run_ok(&f, &["estimate", &j]);
    let sized: u64 = dry
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("file 1"))
        .and_then(|l| l.split_whitespace().rev().nth(1))
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("{}", dry.stdout));
    run_ok(&f, &["run", &j]);
    let st = s.stats();
    assert_eq!(
        (st.requests, st.files_uploaded, st.batches_created),
        (0, 1, 1)
    );
    let ops = s.gemini_batches();
    let meta = &ops[0]["metadata"];
    assert!(
        meta["displayName"]
            .as_str()
            .unwrap()
            .starts_with("pm-part="),
        "{meta}"
    );
    assert_eq!(meta["model"], "models/gemini-2.5-flash");
    // The uploaded lines: the row's key and the online request.
    let input = meta["inputConfig"]["fileName"].as_str().unwrap();
    let content = String::from_utf8(s.gemini_file(input).unwrap()).unwrap();
    assert_eq!(content.len() as u64, sized, "{}", dry.stdout);
    let lines: Vec<Value> = content
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    for l in &lines {
        assert!(l["key"].as_str().unwrap().starts_with('r'), "{l}");
        assert_eq!(l["request"]["generationConfig"]["maxOutputTokens"], 200);
    }

    s.advance_batches(); // pending → running
    let r = run_ok(&f, &["batch", "status", &j]);
    assert!(r.stdout.contains("in_progress"), "{}", r.stdout);
    run_ok(&f, &["run", &j]);
    assert_eq!(
        s.stats().batches_created,
        1,
        "a rerun while it runs submits nothing"
    );

    s.complete_batches();
    run_ok(&f, &["batch", "collect", &j]);
    let recs = records(&f);
    assert_eq!(recs.len(), 7);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    for r in &recs {
        assert_eq!(r["mode"], "batch");
        let got = r["cost_usd"].as_f64().unwrap();
        assert!((got - cost_of(&r["usage"], true)).abs() < 1e-12, "{r}");
    }
    billed_equals_kept(&s, &f);
    assert_eq!(s.stats().batch_requests_billed, 7);
    // The key went in every request's header (the server checked it), never in a file.
    for entry in walk(f.dir.path()) {
        let text = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&text).contains(KEY),
            "{}",
            entry.display()
        );
    }

    // `run --wait` submits, polls and collects in one command.
    let s = spawn_background(Config {
        batch_auto_advance: true,
        ..Config::default()
    });
    let f = Fixture::new();
    let j = batch_job(&f, &s, &rows, "");
    run_ok(&f, &["run", "--wait", &j]);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    billed_equals_kept(&s, &f);
}

#[test]
fn a_kill_between_any_two_gemini_batch_steps_loses_nothing_and_submits_nothing_twice() {
    for step in BATCH_STEPS {
        let s = spawn_background(Config::default());
        let f = Fixture::new();
        let rows = batch_rows(12);
        let j = batch_job(&f, &s, &rows, "max_requests_per_file = 5");
        batch_killed_at(&f, &s, &j, step, &[("GEMINI_API_KEY", KEY)]);
        let st = s.stats();
        assert_eq!(
            st.batches_created, 3,
            "{step}: 12 rows in files of 5, each once"
        );
        assert_eq!(
            st.batch_requests_billed, 12,
            "{step}: every row billed once"
        );
        assert_eq!(ok_completions(&f), echo_all(&rows), "{step}");
        assert_eq!(records(&f).len(), 12, "{step}");
        billed_equals_kept(&s, &f);
    }
}

#[test]
fn a_gemini_create_whose_answer_is_lost_is_found_by_its_display_name_and_not_sent_again() {
    let s = spawn_background(Config {
        batch_auto_advance: true,
        batch_create_answers_lost: 2,
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = batch_rows(10);
    let j = batch_job(&f, &s, &rows, "max_requests_per_file = 5");
    run_ok(&f, &["run", "--wait", &j]);
    let st = s.stats();
    assert_eq!(
        st.batches_created, 2,
        "each part created once, though both answers were lost"
    );
    assert_eq!(st.batch_requests_billed, 10);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    billed_equals_kept(&s, &f);
}

#[test]
fn an_expired_or_cancelled_gemini_batch_keeps_what_it_answered_and_leaves_the_rest_pending() {
    for end in ["expire", "cancel"] {
        let s = spawn_background(Config {
            batch_lines_per_step: Some(4),
            ..Config::default()
        });
        let f = Fixture::new();
        let rows = batch_rows(10);
        let j = batch_job(&f, &s, &rows, "");
        run_ok(&f, &["run", &j]);
        s.advance_batches(); // pending → running
        s.advance_batches(); // 4 lines answered
        if end == "expire" {
            s.expire_batches();
        } else {
            let r = run_ok(&f, &["batch", "cancel", &j]);
            assert!(r.stdout.contains("cancelled"), "{}", r.stdout);
            assert_eq!(s.stats().batches_cancelled, 1);
        }
        run_ok(&f, &["batch", "collect", &j]);
        assert_eq!(
            records(&f).len(),
            4,
            "{end}: the answered lines are kept: they are billed"
        );
        assert_eq!(f.summary()["rows_pending"], 6, "{end}");
        billed_equals_kept(&s, &f);
        // A rerun submits the six that got no answer, and only them.
        run_ok(&f, &["run", &j]);
        assert_eq!(s.stats().batches_created, 2, "{end}");
        let second = &s.gemini_batches()[1]["metadata"];
        let input = second["inputConfig"]["fileName"].as_str().unwrap();
        assert_eq!(
            String::from_utf8(s.gemini_file(input).unwrap())
                .unwrap()
                .lines()
                .count(),
            6,
            "{end}"
        );
        s.complete_batches();
        run_ok(&f, &["batch", "collect", &j]);
        assert_eq!(ok_completions(&f), echo_all(&rows), "{end}");
        assert_eq!(
            s.stats().batch_requests_billed,
            10,
            "{end}: no row paid twice"
        );
        billed_equals_kept(&s, &f);
    }
}

#[test]
fn a_failed_gemini_batch_says_why_bills_nothing_and_leaves_its_rows_pending() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows = vec!["item 1".to_string(), "item 2 FAULT:batchfail".to_string()];
    let j = batch_job(&f, &s, &rows, "");
    run_ok(&f, &["run", &j]);
    s.advance_batches(); // pending → failed
    assert_eq!(
        s.gemini_batches()[0]["metadata"]["state"],
        "BATCH_STATE_FAILED"
    );
    let r = run(&f, &["batch", "collect", &j]);
    assert!(
        r.stderr.contains("INVALID_ARGUMENT") || r.stdout.contains("INVALID_ARGUMENT"),
        "the API's reason is shown: {} {}",
        r.stdout,
        r.stderr
    );
    assert!(read_jsonl_if_there(&f.path("out/result.jsonl"))
        .iter()
        .all(|r| r["status"] != "ok"));
    assert_eq!(f.summary()["rows_pending"], 2);
    assert_eq!(s.stats().batch_requests_billed, 0);
    billed_equals_kept(&s, &f);
}

#[test]
fn images_go_inline_from_files_and_as_file_data_from_urls() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    // A 1×1 PNG.
    let png = [
        137u8, 80, 78, 71, 13, 10, 26, 10, 0, 0, 0, 13, 73, 72, 68, 82, 0, 0, 0, 1, 0, 0, 0, 1, 8,
        6, 0, 0, 0, 31, 21, 196, 137, 0, 0, 0, 13, 73, 68, 65, 84, 120, 218, 99, 100, 96, 248, 95,
        15, 0, 2, 135, 1, 128, 235, 71, 186, 146, 0, 0, 0, 0, 73, 69, 78, 68, 174, 66, 96, 130,
    ];
    f.write("photo.png", png);
    let j = gemini_job(&f, &s, &["boots"], "Be brief.", "", "", "");
    let text = std::fs::read_to_string(&j).unwrap().replace(
        "content = \"Say it about {{ text }}\"",
        "content = \"Say it about {{ text }}\"\nimages = [\"photo.png\", \"https://example.com/shoe.jpg\"]",
    );
    std::fs::write(&j, text).unwrap();
    // The dry run counts them by Gemini's rule: 258 for the small file, 9 tiles for the URL
    // whose size is not known (assumed 2048×2048).
    let dry = run_ok(&f, &["estimate", &j]);
    assert!(
        dry.stdout.contains("2580 prompt tokens") && dry.stdout.contains("Gemini's rule"),
        "{}",
        dry.stdout
    );
    run_ok(&f, &["run", "--quiet", &j]);
    let parts = &s.requests()[0]["contents"][0]["parts"];
    assert_eq!(parts[0]["text"], "Say it about boots");
    assert_eq!(parts[1]["inlineData"]["mimeType"], "image/png", "{parts}");
    assert!(parts[1]["inlineData"]["data"]
        .as_str()
        .unwrap()
        .starts_with("iVBOR"));
    assert_eq!(
        parts[2]["fileData"],
        serde_json::json!({"mimeType": "image/jpeg", "fileUri": "https://example.com/shoe.jpg"})
    );
    assert_eq!(records(&f)[0]["status"], "ok");
}

#[test]
fn a_prompt_over_200k_tokens_on_2_5_pro_is_priced_at_the_long_context_rates() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = gemini_job(
        &f,
        &s,
        &[
            "\"short FAULT:usage=1000,100,0,0\"",
            "\"long FAULT:usage=250000,100,0,0\"",
        ],
        "Be brief.",
        "",
        "",
        "",
    );
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("gemini-2.5-flash", "gemini-2.5-pro");
    std::fs::write(&j, text).unwrap();
    run_ok(&f, &["run", "--quiet", &j]);
    let recs = records(&f);
    let cost = |t: &str| by(&recs, t)["cost_usd"].as_f64().unwrap();
    // $1.25 / $10 per 1M up to 200,000 prompt tokens; $2.50 / $15 past them.
    assert!((cost("short") - (1000.0 * 1.25 + 100.0 * 10.0) / 1e6).abs() < 1e-12);
    assert!((cost("long") - (250_000.0 * 2.50 + 100.0 * 15.0) / 1e6).abs() < 1e-12);
    billed_equals_kept(&s, &f);
}

#[test]
fn a_gemini_part_left_creating_is_found_by_status_and_cancel() {
    let s = spawn_background(Config {
        batch_lines_per_step: Some(2),
        ..Config::default()
    });
    let f = Fixture::new();
    let rows = batch_rows(6);
    let j = batch_job(&f, &s, &rows, "");
    // Killed after the server made the batch, before its id was on record.
    let r = ran(f
        .cmd(&["run", &j])
        .env("GEMINI_API_KEY", KEY)
        .env("PROMPTMILL_FAILPOINT", "batch:create-done")
        .output()
        .unwrap());
    assert_ne!(r.code, 0, "the failpoint killed it");
    assert_eq!(s.stats().batches_created, 1);
    let name = s.gemini_batches()[0]["name"].as_str().unwrap().to_string();
    let id = name.trim_start_matches("batches/").to_string();
    let r = run_ok(&f, &["batch", "status", &j]);
    assert!(
        r.stdout.contains(&id),
        "status finds it by its display name: {}",
        r.stdout
    );
    assert!(r.stdout.contains("answer was lost"), "{}", r.stdout);
    s.advance_batches(); // running
    s.advance_batches(); // two of six lines answered
    let r = run_ok(&f, &["batch", "cancel", &j]);
    assert!(
        r.stdout.contains(&format!("{id}: cancelled")),
        "{}",
        r.stdout
    );
    assert_eq!(s.stats().batches_cancelled, 1);
    run_ok(&f, &["batch", "collect", &j]);
    assert_eq!(records(&f).len(), 2);
    billed_equals_kept(&s, &f);
    // The rows the cancel left go in the next submission; none is billed twice.
    run_ok(&f, &["run", &j]);
    s.complete_batches();
    run_ok(&f, &["batch", "collect", &j]);
    assert_eq!(ok_completions(&f), echo_all(&rows));
    assert_eq!(s.stats().batches_created, 2);
    assert_eq!(s.stats().batch_requests_billed, 6);
    billed_equals_kept(&s, &f);
}
