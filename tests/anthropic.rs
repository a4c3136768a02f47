//! `provider = "anthropic"` through the real binary against the fake server's Messages API:
//! the request as Claude takes it, the prompt cache written once and read after, every cache
//! token priced at its rate, the schema as a forced tool, and the error table (retry, fail
//! the row, stop). Every test counts what the server billed against what the output kept.

use serde_json::Value;

use crate::util::*;

/// A system prompt every row shares, long enough for the cache (the fake server's minimum is
/// 1,024 tokens of four characters).
pub(crate) fn long_rules() -> String {
    "Write in plain words, one short sentence, no lists. ".repeat(90)
}

/// A Claude job over `rows` (a `text` column); `model` and `output` are appended to their tables.
pub(crate) fn claude_job(
    f: &Fixture,
    s: &FakeServer,
    rows: &[&str],
    model: &str,
    output: &str,
) -> String {
    let mut csv = String::from("text\n");
    for r in rows {
        csv.push_str(r);
        csv.push('\n');
    }
    f.write("data.csv", csv);
    let p = f.write(
        "claude.toml",
        format!(
            r#"
[input]
path = "data.csv"

[[messages]]
role = "system"
content = "{rules}"

[[messages]]
role = "user"
content = "Say it about {{{{ text }}}}"

[model]
provider = "anthropic"
name = "claude-sonnet-4-5"
base_url = "{base}"
max_tokens = 200
{model}

[run]
concurrency = 1
max_retries = 4
timeout_s = 5

[output]
path = "out/result.jsonl"
csv = "out/result.csv"
{output}
"#,
            rules = long_rules(),
            base = s.root_url(),
        ),
    );
    p.to_str().unwrap().to_string()
}

/// The schema the structured tests use: a short headline and a list of tags.
fn write_ad_schema(f: &Fixture) {
    f.write(
        "schemas/ad.json",
        r#"{"type": "object", "properties": {"headline": {"type": "string", "maxLength": 30},
            "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["headline", "tags"], "additionalProperties": false}"#,
    );
}

pub(crate) fn run(f: &Fixture, args: &[&str]) -> Ran {
    ran(f
        .cmd(args)
        .env("ANTHROPIC_API_KEY", KEY)
        .env_remove("ANTHROPIC_BASE_URL")
        .output()
        .unwrap())
}

/// `run --quiet` that must exit 0.
pub(crate) fn run_ok(f: &Fixture, job: &str) -> Ran {
    let r = run(f, &["run", "--quiet", job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r
}

pub(crate) fn billed_equals_kept(s: &FakeServer, f: &Fixture) {
    let st = s.stats();
    let recs = read_jsonl(&f.path("out/result.jsonl"));
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

/// claude-sonnet-4-5's list prices per 1M tokens: input, cache read, cache write (5 min), output.
pub(crate) const SONNET: (f64, f64, f64, f64) = (3.0, 0.30, 3.75, 15.0);

pub(crate) fn cost_of(u: &Value) -> f64 {
    let n = |k: &str| u[k].as_f64().unwrap_or(0.0);
    let (read, written) = (n("cached_tokens"), n("cache_write_tokens"));
    ((n("prompt_tokens") - read - written) * SONNET.0
        + read * SONNET.1
        + written * SONNET.2
        + n("completion_tokens") * SONNET.3)
        / 1e6
}

#[test]
fn a_claude_job_sends_messages_caches_the_shared_prefix_and_prices_every_token() {
    let s = spawn_background(Config {
        require_key: Some(KEY.into()),
        ..Default::default()
    });
    let f = Fixture::new();
    let j = claude_job(
        &f,
        &s,
        &["boots", "hats", "socks"],
        "temperature = 0.2\nstop = [\"END\"]\nuser = \"u-7\"\nextra = { top_k = 5 }",
        "",
    );
    let ran = run_ok(&f, &j);

    // The body as the Messages API takes it: system at the top, the breakpoint after it.
    let body = &s.requests()[0];
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert_eq!(body["max_tokens"], 200);
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["stop_sequences"], serde_json::json!(["END"]));
    assert_eq!(body["metadata"]["user_id"], "u-7");
    assert_eq!(body["top_k"], 5, "extra passes through");
    assert_eq!(body["system"][0]["text"], long_rules());
    assert_eq!(body["system"][0]["cache_control"]["type"], "ephemeral");
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1, "{body}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[0]["content"][0]["text"], "Say it about boots");
    assert!(msgs[0]["content"][0].get("cache_control").is_none());

    let recs = read_jsonl(&f.path("out/result.jsonl"));
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    // The first row writes the cache, the next ones read it.
    let u0 = &recs[0]["usage"];
    let written = u0["cache_write_tokens"].as_u64().unwrap();
    assert!(written >= 1024, "{u0}");
    assert!(u0.get("cached_tokens").is_none_or(|c| c == 0), "{u0}");
    for r in &recs[1..] {
        assert_eq!(r["usage"]["cached_tokens"].as_u64(), Some(written), "{r}");
        assert!(
            r["usage"]["cache_write_tokens"].as_u64().unwrap_or(0) == 0,
            "{r}"
        );
    }
    for r in &recs {
        let got = r["cost_usd"].as_f64().unwrap();
        assert!(
            (got - cost_of(&r["usage"])).abs() < 1e-12,
            "{got} for {}",
            r["usage"]
        );
    }
    // A cache read costs a tenth of the input it stands for.
    assert!(recs[1]["cost_usd"].as_f64() < recs[0]["cost_usd"].as_f64());
    // What caching saved: the same tokens at the input rate, minus what was paid; the first
    // row's write cost more than it saved.
    let saved: f64 = recs
        .iter()
        .map(|r| {
            let u = &r["usage"];
            let full = (u["prompt_tokens"].as_f64().unwrap() * SONNET.0
                + u["completion_tokens"].as_f64().unwrap() * SONNET.3)
                / 1e6;
            let got = r["cache_saved_usd"].as_f64().unwrap();
            assert!((got - (full - cost_of(u))).abs() < 1e-12, "{r}");
            got
        })
        .sum();
    assert!(recs[0]["cache_saved_usd"].as_f64().unwrap() < 0.0);
    assert!(saved > 0.0);
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("out/result.jsonl.summary.json")).unwrap(),
    )
    .unwrap();
    assert!(
        (summary["cache_saved_usd"].as_f64().unwrap() - saved).abs() < 1e-9,
        "{summary}"
    );
    assert_eq!(summary["cache_write_tokens"].as_u64(), Some(written));
    assert_eq!(summary["cached_tokens"].as_u64(), Some(2 * written));
    let r = run(&f, &["report", "out/result.jsonl", "-o", "report.html"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let html = std::fs::read_to_string(f.path("report.html")).unwrap();
    assert!(
        html.contains("prompt cache (last run)"),
        "the report shows no cache line"
    );
    let line = format!("{} written, saved ${saved:.4}", written);
    assert!(html.contains(&line), "the report does not say {line}");
    billed_equals_kept(&s, &f);
    for entry in walk(f.dir.path()) {
        let text = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&text).contains(KEY),
            "{}",
            entry.display()
        );
    }
    assert!(!ran.stderr.contains(KEY) && !r.stderr.contains(KEY));

    // `prompt_cache = "off"` sends no breakpoint, and nothing is cached.
    let s2 = spawn_background(Config::default());
    let f2 = Fixture::new();
    let j2 = claude_job(&f2, &s2, &["boots", "hats"], "prompt_cache = \"off\"", "");
    assert_eq!(run(&f2, &["run", "--quiet", &j2]).code, 0);
    assert!(s2.requests()[0]["system"][0].get("cache_control").is_none());
    let recs = read_jsonl(&f2.path("out/result.jsonl"));
    assert!(recs.iter().all(
        |r| r["usage"].get("cache_write_tokens").is_none_or(|c| c == 0)
            && r["usage"].get("cached_tokens").is_none_or(|c| c == 0)
    ));
}

#[test]
fn overloaded_and_rate_limited_are_retried_and_a_bad_row_fails_alone() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(
        &f,
        &s,
        &[
            "one FAULT:529:2",
            "two FAULT:429:1",
            "three FAULT:500:1",
            "four FAULT:413",
        ],
        "",
        "",
    );
    let r = run(&f, &["run", "--quiet", &j]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    let by = |t: &str| {
        recs.iter()
            .find(|r| r["input"]["text"].as_str().unwrap().starts_with(t))
            .unwrap()
    };
    for t in ["one", "two", "three"] {
        assert_eq!(by(t)["status"], "ok", "{}", by(t));
    }
    assert_eq!(by("one")["attempts"], 3);
    assert_eq!(by("four")["status"], "error");
    assert_eq!(by("four")["error"]["kind"], "bad_request");
    assert!(by("four")["error"]["message"]
        .as_str()
        .unwrap()
        .contains("request_too_large"));
    // 2 + 1 + 1 faults, then an answer each; the 413 once.
    assert_eq!(s.stats().requests, 3 + 2 + 2 + 1);
    billed_equals_kept(&s, &f);
}

#[test]
fn a_wrong_key_or_a_forbidden_one_stops_the_job_and_a_rerun_finishes_once() {
    let s = spawn_background(Config {
        require_key: Some("right-key".into()),
        ..Default::default()
    });
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["a", "b", "c"], "", "");
    let r = run(&f, &["run", "--quiet", &j]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("authentication_error"), "{}", r.stderr);
    assert!(read_jsonl_if_there(&f.path("out/result.jsonl")).is_empty());
    let r = ran(f
        .cmd(&["run", "--quiet", &j])
        .env("ANTHROPIC_API_KEY", "right-key")
        .output()
        .unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(read_jsonl(&f.path("out/result.jsonl")).len(), 3);
    billed_equals_kept(&s, &f);

    // A 403 permission_error stops it too, with nothing paid.
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["x FAULT:403"], "", "");
    let r = run(&f, &["run", "--quiet", &j]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("permission_error"), "{}", r.stderr);
    assert_eq!(s.stats().billed_prompt_tokens, 0);
}

#[test]
fn a_schema_goes_out_as_a_forced_tool_and_its_fields_become_columns() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    write_ad_schema(&f);
    let j = claude_job(
        &f,
        &s,
        &["boots", "hats"],
        "",
        "schema = \"schemas/ad.json\"",
    );
    run_ok(&f, &j);
    let body = &s.requests()[0];
    assert!(body.get("response_format").is_none(), "{body}");
    assert_eq!(body["tool_choice"]["type"], "tool");
    let name = body["tool_choice"]["name"].as_str().unwrap();
    assert_eq!(body["tools"][0]["name"], name);
    assert_eq!(
        body["tools"][0]["input_schema"]["properties"]["headline"]["maxLength"],
        30
    );
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    let d = &recs[0]["data"];
    assert!(
        d["headline"].as_str().unwrap().len() <= 30 && d["tags"].is_array(),
        "{d}"
    );
    let mut rdr = csv::Reader::from_path(f.path("out/result.csv")).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert!(header.iter().any(|h| h == "headline") && header.iter().any(|h| h == "tags"));
    billed_equals_kept(&s, &f);
}

#[test]
fn a_claude_job_without_max_tokens_or_with_what_is_not_built_is_refused_by_field() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["a"], "", "");
    let text = std::fs::read_to_string(&j).unwrap();
    for (from, to, field) in [
        ("max_tokens = 200\n", "", "model.max_tokens"),
        ("\n[run]\n", "n = 2\n[run]\nmode = \"batch\"\n", "model.n"),
        (
            "\n[run]\n",
            "prompt_cache_key = \"k\"\n[run]\n",
            "model.prompt_cache_key",
        ),
    ] {
        std::fs::write(&j, text.replace(from, to)).unwrap();
        let r = run(&f, &["validate", &j]);
        assert_ne!(r.code, 0, "{field}");
        assert!(r.stderr.contains(field), "{field}: {}", r.stderr);
    }
    // `prompt_cache` belongs to Claude.
    let o = f.job(
        "data.csv",
        "{{ text }}",
        "prompt_cache = \"1h\"",
        "",
        &s.base_url(),
    );
    let r = run(&f, &["validate", o.to_str().unwrap()]);
    assert!(r.stderr.contains("model.prompt_cache"), "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn the_budget_holds_across_runs_at_claudes_prices() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let rows: Vec<String> = (0..12).map(|i| format!("row {i}")).collect();
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let j = claude_job(&f, &s, &rows, "", "");
    // A row's worst case is about $0.0064 (1,100+ prompt tokens at $3, 200 out at $15); what
    // it costs is far less once the prefix is cached, so a few rows fit in $0.012.
    let text = std::fs::read_to_string(&j).unwrap();
    std::fs::write(&j, text.replace("[run]\n", "[run]\nmax_cost_usd = 0.012\n")).unwrap();
    budget_holds_across_runs(&s, &f, 0.012, 12, || run(&f, &["run", "--quiet", &j]));
    billed_equals_kept(&s, &f);
}

#[test]
fn a_streamed_claude_job_assembles_its_events_and_retries_a_stream_that_errors() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["boots", "hats FAULT:cut:1"], "stream = true", "");
    run_ok(&f, &j);
    assert_eq!(s.requests()[0]["stream"], true);
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    for r in &recs {
        let text = r["completion"].as_str().unwrap();
        assert!(
            text.contains(
                r["input"]["text"]
                    .as_str()
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
            ),
            "{r}"
        );
        assert!(r["ttft_ms"].is_u64(), "{r}");
        let got = r["cost_usd"].as_f64().unwrap();
        assert!((got - cost_of(&r["usage"])).abs() < 1e-12, "{r}");
    }
    // The stream that ended in an `error` event was sent again.
    let hats = recs
        .iter()
        .find(|r| r["input"]["text"].as_str().unwrap().starts_with("hats"))
        .unwrap();
    assert_eq!(hats["attempts"], 2, "{hats}");
    assert_eq!(s.stats().requests, 3);
    // The cut stream was billed and is not kept: what the server billed is what the output
    // kept plus that one answer (the same request, so the same usage as the one kept).
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
        ),
        "billed vs kept plus the cut stream"
    );

    // A schema streams as the forced tool's partial JSON.
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    write_ad_schema(&f);
    let j = claude_job(
        &f,
        &s,
        &["boots"],
        "stream = true",
        "schema = \"schemas/ad.json\"",
    );
    run_ok(&f, &j);
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    assert!(recs[0]["data"]["headline"].is_string(), "{}", recs[0]);
    billed_equals_kept(&s, &f);
}

#[test]
fn the_dry_run_marks_claudes_counts_as_estimates_and_says_what_caching_saves() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["boots", "hats", "socks"], "", "");
    let r = run(&f, &["estimate", &j]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("tokenizer is not public"), "{}", r.stdout);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("shared prefix"))
        .unwrap();
    let prefix: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(prefix > 1024.0, "{line}");
    // Sonnet at list prices: two reads save 2.7 a token per 1M, one write costs 0.75 more.
    let want = (2.0 * (3.0 - 0.30) - 0.75) * prefix / 1e6;
    assert!(
        r.stdout.contains(&format!("should save ${want:.6}")),
        "{}",
        r.stdout
    );
    assert_eq!(s.stats().requests, 0);
    // A prefix under the model's minimum is said to be too short.
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace(&long_rules(), "Be brief.");
    std::fs::write(&j, text).unwrap();
    let r = run(&f, &["estimate", &j]);
    assert!(r.stdout.contains("nothing cached"), "{}", r.stdout);
}

#[test]
fn claudes_rate_limit_headers_pace_the_run_and_its_429s_are_retried() {
    // 4 requests a 2-second window, 12 rows at concurrency 8: the limiter must refuse some.
    let s = spawn_background(Config {
        rpm: Some(120),
        window_s: 2.0,
        ..Default::default()
    });
    let f = Fixture::new();
    let rows: Vec<String> = (0..12).map(|i| format!("row {i}")).collect();
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    let j = claude_job(&f, &s, &rows, "", "");
    let text = std::fs::read_to_string(&j).unwrap();
    std::fs::write(
        &j,
        text.replace("concurrency = 1", "concurrency = 8")
            .replace("max_retries = 4", "max_retries = 20"),
    )
    .unwrap();
    run_ok(&f, &j);
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    assert_eq!(recs.len(), 12);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    let st = s.stats();
    // Every 429 was sent again, and nothing else was: requests = rows + 429s.
    assert_eq!(st.requests, 12 + st.rate_limited, "{st:?}");
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("out/result.jsonl.summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["rate_limited"].as_u64(), Some(st.rate_limited));
    billed_equals_kept(&s, &f);
}

#[test]
fn the_one_hour_cache_is_asked_for_and_its_writes_are_priced_at_twice_the_input_rate() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["boots", "hats"], "prompt_cache = \"1h\"", "");
    run_ok(&f, &j);
    assert_eq!(s.requests()[0]["system"][0]["cache_control"]["ttl"], "1h");
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    let u = &recs[0]["usage"];
    let written = u["cache_write_tokens"].as_f64().unwrap();
    assert_eq!(u["cache_write_1h_tokens"].as_f64(), Some(written), "{u}");
    let fresh = u["prompt_tokens"].as_f64().unwrap() - written;
    // Sonnet: a 1-hour write is $6 per 1M (twice the $3 input rate).
    let want =
        (fresh * SONNET.0 + written * 6.0 + u["completion_tokens"].as_f64().unwrap() * SONNET.3)
            / 1e6;
    assert!(
        (recs[0]["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
        "{}",
        recs[0]
    );
    assert_eq!(recs[1]["usage"]["cached_tokens"].as_f64(), Some(written));
    assert!((recs[1]["cost_usd"].as_f64().unwrap() - cost_of(&recs[1]["usage"])).abs() < 1e-12);
    billed_equals_kept(&s, &f);
}

/// Claude has no `n`: three choices are three requests of the same body, their usage summed
/// on the row's record; when one fails after others were answered, what they cost stays on
/// the record.
#[test]
fn n_choices_from_claude_are_n_requests_and_a_failure_keeps_what_was_paid() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(
        &f,
        &s,
        &["boots", "hats"],
        "n = 3\nprompt_cache = \"off\"",
        "",
    );
    run_ok(&f, &j);
    assert_eq!(s.stats().requests, 6, "three requests a row");
    let bodies = s.requests();
    assert!(
        bodies.iter().all(|b| b.get("n").is_none()),
        "no `n` goes to Claude"
    );
    for r in f.records() {
        assert_eq!(r["status"], "ok");
        assert_eq!(r["variants"].as_array().map(Vec::len), Some(3), "{r}");
        let cost = r["cost_usd"].as_f64().unwrap();
        assert!((cost - cost_of(&r["usage"])).abs() < 1e-12);
    }
    billed_equals_kept(&s, &f);

    // The second request of the row fails, with no retry: the first is paid and kept.
    let s = spawn_background(Config {
        fail_every: Some(2),
        ..Config::default()
    });
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["boots"], "n = 3\nprompt_cache = \"off\"", "");
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("max_retries = 4", "max_retries = 0");
    std::fs::write(&j, text).unwrap();
    let r = run(&f, &["run", "--quiet", &j]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        s.stats().requests,
        2,
        "the third is not sent after the second failed"
    );
    let rec = &f.records()[0];
    assert_eq!(rec["status"], "error", "{rec}");
    assert!(
        rec["error"]["message"]
            .as_str()
            .unwrap()
            .contains("choice 2 of 3"),
        "{rec}"
    );
    assert!(
        rec["cost_usd"].as_f64().unwrap() > 0.0,
        "the answered choice's cost is kept"
    );
    billed_equals_kept(&s, &f);
}

/// With no schema or checks to judge it, a refusal still fails its row (kind `refusal`, once,
/// never retried) with what it cost on the record: never an `ok` row with no text.
#[test]
fn a_refusal_fails_its_row_without_a_shape_and_keeps_its_cost() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = claude_job(&f, &s, &["boots", "hats FAULT:refusal"], "", "");
    let r = run(&f, &["run", "--quiet", &j]);
    assert_eq!(r.code, 1, "a row failed: {}", r.stderr);
    let recs = read_jsonl(&f.path("out/result.jsonl"));
    let refused = recs
        .iter()
        .find(|r| r["input"]["text"] == "hats FAULT:refusal")
        .unwrap();
    assert_eq!(refused["status"], "error", "{refused}");
    assert_eq!(refused["error"]["kind"], "refusal");
    assert_eq!(refused["attempts"], 1, "not retried");
    assert!(
        refused["cost_usd"].as_f64().unwrap() > 0.0,
        "what it cost is kept"
    );
    assert_eq!(s.stats().requests, 2);
    billed_equals_kept(&s, &f);
}

/// Claude has no `n`: the dry run's cost bound pays the prompt once a choice, so two choices
/// bound at exactly twice one choice (with OpenAI's `n` the prompt would be paid once).
#[test]
fn the_dry_run_bounds_n_choices_from_claude_as_n_whole_requests() {
    let s = spawn_background(Config::default());
    let bound = |n: u32| -> f64 {
        let f = Fixture::new();
        let j = claude_job(
            &f,
            &s,
            &["boots"],
            &format!("n = {n}\nprompt_cache = \"off\""),
            "",
        );
        let r = run(&f, &["estimate", &j]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let out = format!("{}{}", r.stdout, r.stderr);
        let line = out
            .lines()
            .find(|l| l.starts_with("cost bound"))
            .expect("a bound line");
        line.split('$')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (one, two) = (bound(1), bound(2));
    assert!(one > 0.0);
    assert!((two - 2.0 * one).abs() <= 2e-6, "{one} and {two}");
    assert_eq!(s.stats().requests, 0);
}
