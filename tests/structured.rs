//! Content in the shape people need, through the real binary against the fake server: a
//! schema sent as response_format and every completion validated, what breaks it asked for
//! again (and paid for), checks on plain text, refusals, variants, and time to first token.
//! Every test counts what the server billed against what the output kept.

use serde_json::Value;

use crate::util::*;

const SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "headline": {"type": "string", "maxLength": 30},
    "description": {"type": "string", "maxLength": 90},
    "tags": {"type": "array", "items": {"type": "string"}}
  },
  "required": ["headline", "description", "tags"],
  "additionalProperties": false
}"#;

/// A job over `texts` (a `name` column) with `output` appended to its [output] table.
fn job(f: &Fixture, s: &FakeServer, texts: &[&str], model: &str, output: &str) -> String {
    let mut csv = String::from("name\n");
    for t in texts {
        csv.push_str(t);
        csv.push('\n');
    }
    f.write("data.csv", csv);
    f.write("schemas/ad.json", SCHEMA);
    let j = f.job("data.csv", "Ad for {{ name }}", model, "", &s.base_url());
    // Room for a whole JSON document: at 20 tokens the answer is cut off mid-string.
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("max_tokens = 20", "max_tokens = 200");
    std::fs::write(&j, format!("{text}{output}\n")).unwrap();
    j.to_str().unwrap().to_string()
}

/// What the server billed equals what the output kept, its stale file's records included.
fn billed_equals_kept(s: &FakeServer, f: &Fixture) {
    let st = s.stats();
    assert_eq!(
        (st.billed_prompt_tokens, st.billed_completion_tokens),
        kept_with_stale(f),
        "billed vs kept"
    );
}

#[test]
fn a_schema_goes_out_as_json_schema_and_its_fields_become_columns() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme boots", "Zed hats"],
        "",
        "schema = \"schemas/ad.json\"",
    );
    ok(&f.run(&["run", "--quiet", &j]));
    let body = &s.requests()[0];
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["name"], "ad");
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["headline"]["maxLength"],
        30
    );
    let recs = f.records();
    assert_eq!(recs.len(), 2);
    let d = &recs[0]["data"];
    assert!(d["headline"].as_str().unwrap().len() <= 30);
    assert!(d["tags"].is_array());
    assert!(recs[0].get("invalid_attempts").is_none());
    // One column per top-level property, in the schema's order; nested values as JSON text.
    let mut rdr = csv::Reader::from_path(f.path("out/result.csv")).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    let at = |n: &str| header.iter().position(|h| h == n).unwrap();
    assert!(at("completion") < at("headline"));
    assert!(at("headline") < at("description") && at("description") < at("tags"));
    let row: Vec<String> = rdr
        .records()
        .next()
        .unwrap()
        .unwrap()
        .iter()
        .map(String::from)
        .collect();
    assert_eq!(row[at("headline")], d["headline"].as_str().unwrap());
    let tags: Value = serde_json::from_str(&row[at("tags")]).unwrap();
    assert_eq!(tags, d["tags"]);
    // The dry run counts the schema's tokens into every prompt, and says it is an estimate.
    let dry = f.run(&["estimate", &j]);
    ok(&dry);
    assert!(dry.stdout.contains("of which schema"), "{}", dry.stdout);
}

#[test]
fn broken_json_is_asked_again_and_every_attempt_is_paid_and_recorded() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme FAULT:badjsonout:1", "Zed FAULT:schemabreak:1", "fine"],
        "",
        "schema = \"schemas/ad.json\"",
    );
    ok(&f.run(&["run", "--quiet", &j]));
    assert_eq!(s.stats().requests, 5, "two rows asked twice, one once");
    let recs = f.records();
    for r in &recs[..2] {
        assert_eq!(r["status"], "ok");
        let inv = r["invalid_attempts"].as_array().unwrap();
        assert_eq!(inv.len(), 1);
        assert_eq!(inv[0]["attempt"], 1);
        assert!(r["data"]["headline"].is_string());
    }
    let p0 = recs[0]["invalid_attempts"][0]["problems"][0]
        .as_str()
        .unwrap();
    assert!(p0.contains("not valid JSON"), "{p0}");
    let p1 = recs[1]["invalid_attempts"][0]["problems"][0]
        .as_str()
        .unwrap();
    assert!(p1.contains("required"), "{p1}");
    billed_equals_kept(&s, &f);
    // Cost covers both attempts: it is the usage's price.
    let u = &recs[0]["usage"];
    let want = (u["prompt_tokens"].as_f64().unwrap() * 0.15
        + u["completion_tokens"].as_f64().unwrap() * 0.60)
        / 1e6;
    assert!((recs[0]["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12);
}

#[test]
fn a_completion_wrong_every_time_fails_as_invalid_output_quoting_path_and_rule() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["always FAULT:schemabreak"],
        "",
        "schema = \"schemas/ad.json\"\nmax_invalid = 2",
    );
    let r = f.run(&["run", "--quiet", &j]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        s.stats().requests,
        3,
        "the first request and max_invalid more"
    );
    let rec = &f.records()[0];
    assert_eq!(rec["status"], "error");
    assert_eq!(rec["error"]["kind"], "invalid_output");
    let msg = rec["error"]["message"].as_str().unwrap();
    assert!(msg.contains("required"), "{msg}");
    assert_eq!(rec["invalid_attempts"].as_array().unwrap().len(), 3);
    billed_equals_kept(&s, &f);
    // A verdict: a plain rerun leaves it, --retry-failed asks again.
    let r = f.run(&["run", "--quiet", &j]);
    assert_eq!(r.code, 1, "the row is still failed: {}", r.stderr);
    assert_eq!(s.stats().requests, 3);
    let r = f.run(&["run", "--quiet", "--retry-failed", &j]);
    assert_eq!(r.code, 1, "wrong again: {}", r.stderr);
    assert_eq!(s.stats().requests, 6, "asked again, with its re-asks");
    billed_equals_kept(&s, &f);
}

#[test]
fn a_refusal_is_its_own_kind_and_is_not_asked_again() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["no FAULT:refusal"],
        "",
        "schema = \"schemas/ad.json\"",
    );
    let r = f.run(&["run", "--quiet", &j]);
    assert_eq!(r.code, 1);
    assert_eq!(s.stats().requests, 1);
    let rec = &f.records()[0];
    assert_eq!(rec["error"]["kind"], "refusal");
    assert!(rec["error"]["message"]
        .as_str()
        .unwrap()
        .contains("can't help"));
    billed_equals_kept(&s, &f);
}

#[test]
fn checks_on_plain_text_regenerate_and_say_which_failed_on_which_attempt() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    // Google Ads: a 30-character headline that names the product.
    let j = job(
        &f,
        &s,
        &["Acme FAULT:long:1", "Zed"],
        "",
        "[output.checks]\nmax_chars = 60\nmust_contain = [\"{{ name }}\"]\nmust_not_match = \"(?i)free\"",
    );
    ok(&f.run(&["run", "--quiet", &j]));
    let recs = f.records();
    let inv = recs[0]["invalid_attempts"].as_array().unwrap();
    assert_eq!(inv[0]["attempt"], 1);
    assert!(inv[0]["problems"][0]
        .as_str()
        .unwrap()
        .starts_with("max_chars"));
    assert!(recs[0]["completion"].as_str().unwrap().chars().count() <= 60);
    assert!(recs[1].get("invalid_attempts").is_none());
    assert_eq!(s.stats().requests, 3);
    billed_equals_kept(&s, &f);

    // A literal the model never writes: fails after max_invalid, naming the check.
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme"],
        "",
        "max_invalid = 1\n[output.checks]\nmust_contain = [\"ACME™\"]",
    );
    let r = f.run(&["run", "--quiet", &j]);
    assert_eq!(r.code, 1);
    let rec = &f.records()[0];
    assert_eq!(rec["error"]["kind"], "invalid_output");
    assert!(rec["error"]["message"]
        .as_str()
        .unwrap()
        .contains("must_contain"));
    assert_eq!(s.stats().requests, 2);
}

#[test]
fn variants_are_kept_and_only_failing_ones_are_asked_again() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme FAULT:schemabreak@1:1", "Zed"],
        "n = 3",
        "schema = \"schemas/ad.json\"",
    );
    // The dry run's cost bound counts n times max_tokens: 2 rows × 3 × 200.
    let dry = f.run(&["estimate", &j]);
    assert!(
        dry.stdout.contains("max output tokens 1200"),
        "{}",
        dry.stdout
    );
    ok(&f.run(&["run", "--quiet", &j]));
    let bodies = s.requests();
    assert_eq!(bodies.len(), 3);
    let ns: Vec<Value> = bodies.iter().map(|b| b["n"].clone()).collect();
    assert!(
        ns.contains(&Value::Null),
        "the regeneration asks for one: {ns:?}"
    );
    assert_eq!(ns.iter().filter(|n| **n == 3).count(), 2);
    let recs = f.records();
    for r in &recs {
        let v = r["variants"].as_array().unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(r["completion"], v[0]["completion"]);
        assert!(v.iter().all(|x| x["data"]["headline"].is_string()));
    }
    assert_eq!(recs[0]["invalid_attempts"][0]["variant"], 1);
    billed_equals_kept(&s, &f);
    // The CSV: one line per variant, with a variant column; cost on the first line only.
    let mut rdr = csv::Reader::from_path(f.path("out/result.csv")).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    let vcol = header.iter().position(|h| h == "variant").unwrap();
    let ccol = header.iter().position(|h| h == "cost_usd").unwrap();
    let lines: Vec<Vec<String>> = rdr
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines.iter().map(|l| l[vcol].clone()).collect::<Vec<_>>(),
        ["1", "2", "3", "1", "2", "3"]
    );
    assert!(!lines[0][ccol].is_empty() && lines[1][ccol].is_empty());
}

#[test]
fn json_object_and_streamed_variants_with_time_to_first_token() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme", "Zed"],
        "stream = true\nn = 2",
        "response_format = \"json_object\"",
    );
    ok(&f.run(&["run", "--quiet", &j]));
    assert_eq!(s.requests()[0]["response_format"]["type"], "json_object");
    for r in f.records() {
        assert!(r["data"]["text"]
            .as_str()
            .unwrap()
            .starts_with("echo: Ad for"));
        assert_eq!(r["variants"].as_array().unwrap().len(), 2);
        assert_ne!(
            r["variants"][0]["completion"],
            r["variants"][1]["completion"]
        );
        assert!(r["ttft_ms"].is_u64(), "{r}");
    }
    let sum = f.summary();
    assert!(sum["ttft_p50_ms"].is_u64(), "{sum}");
    assert!(sum["ttft_p95_ms"].is_u64());
    billed_equals_kept(&s, &f);
}

#[test]
fn a_bad_schema_or_check_is_a_job_error_naming_the_field() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(&f, &s, &["x"], "", "schema = \"schemas/missing.json\"");
    let r = f.run(&["validate", &j]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("output.schema") && r.stderr.contains("missing.json"),
        "{}",
        r.stderr
    );
    let j = job(
        &f,
        &s,
        &["x"],
        "",
        "[output.checks]\nmust_match = \"(unclosed\"",
    );
    let r = f.run(&["validate", &j]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("output.checks.must_match"),
        "{}",
        r.stderr
    );
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn batch_answers_are_judged_too_and_one_that_breaks_the_schema_fails_its_row() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme", "Zed FAULT:schemabreak"],
        "n = 2",
        "schema = \"schemas/ad.json\"",
    );
    let text = std::fs::read_to_string(&j)
        .unwrap()
        .replace("[run]\n", "[run]\nmode = \"batch\"\n");
    std::fs::write(&j, text).unwrap();
    ok(&f.run(&["run", "--quiet", &j]));
    s.complete_batches();
    let r = f.run(&["batch", "collect", "--quiet", &j]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs[0]["status"], "ok");
    assert_eq!(recs[0]["variants"].as_array().unwrap().len(), 2);
    assert!(recs[0]["data"]["headline"].is_string());
    assert_eq!(recs[1]["error"]["kind"], "invalid_output");
    assert_eq!(recs[1]["mode"], "batch");
    billed_equals_kept(&s, &f);
}

/// Usage over every record the output keeps: its own and the stale file's.
fn kept_with_stale(f: &Fixture) -> (u64, u64) {
    let stale = read_jsonl_if_there(&f.path("out/result.stale.jsonl"));
    f.records().iter().chain(&stale).fold((0, 0), |(p, c), r| {
        (
            p + r["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            c + r["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        )
    })
}

#[test]
fn a_stop_before_the_re_ask_keeps_the_paid_first_answer_on_record() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    // The first row's answer breaks the schema and comes late; the second stops the job (401)
    // while the first is still out.
    let j = job(
        &f,
        &s,
        &["Acme FAULT:schemabreak:1 FAULT:slow=800", "Zed FAULT:401"],
        "",
        "schema = \"schemas/ad.json\"",
    );
    let r = f.run(&["run", "--quiet", "--concurrency", "2", &j]);
    assert_eq!(r.code, 2, "the auth stop: {}", r.stderr);
    assert_eq!(s.stats().requests, 2, "no re-ask after the stop");
    let st = s.stats();
    assert!(st.billed_prompt_tokens > 0);
    let acme = f
        .records()
        .into_iter()
        .find(|r| r["input"]["name"] == "Acme FAULT:schemabreak:1 FAULT:slow=800")
        .expect("the paid row has a record");
    assert_eq!(acme["status"], "error");
    assert_eq!(acme["error"]["kind"], "interrupted");
    assert!(acme["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(acme["invalid_attempts"].as_array().unwrap().len(), 1);
    billed_equals_kept(&s, &f);
    // The budget saw it: the summary's spend is the record's.
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(f.path("out/result.jsonl.summary.json")).unwrap(),
    )
    .unwrap();
    let spent = summary["cost_usd"].as_f64().unwrap();
    assert!(
        (spent - acme["cost_usd"].as_f64().unwrap()).abs() < 1e-12,
        "{summary}"
    );

    // A plain rerun asks the interrupted row again; the paid record is kept (as stale).
    let text = std::fs::read_to_string(f.path("data.csv"))
        .unwrap()
        .replace("Zed FAULT:401", "Zed");
    f.write("data.csv", text);
    ok(&f.run(&["run", "--quiet", &j]));
    let recs = f.records();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["status"] == "ok"), "{recs:?}");
    billed_equals_kept(&s, &f);
}

#[test]
fn ctrl_c_twice_during_a_re_ask_keeps_the_paid_first_answer_on_record() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    let j = job(
        &f,
        &s,
        &["Acme FAULT:schemabreak:1 FAULT:slow=1500"],
        "",
        "schema = \"schemas/ad.json\"",
    );
    let child = f
        .cmd(&["run", "--quiet", &j])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.stats().requests < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-ask never came"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let paid = s.stats();
    for _ in 0..2 {
        let status = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 130, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 1, "{}", r.stderr);
    assert_eq!(recs[0]["error"]["kind"], "interrupted");
    // The first answer's usage is on record; the aborted re-ask is carried at its worst case.
    assert_eq!(
        (paid.billed_prompt_tokens, paid.billed_completion_tokens),
        kept_with_stale(&f)
    );
    assert!(
        recs[0]["unconfirmed_usd"].as_f64().unwrap() > 0.0,
        "{}",
        recs[0]
    );
}

/// The worst case each part of a batch job put on record, per request.
fn batch_worst_per_request(f: &Fixture) -> f64 {
    let log = read_jsonl(&f.path("out/result.jsonl.batches.jsonl"));
    let (usd, n) =
        log.iter()
            .filter(|e| e["worst_usd"].is_number())
            .fold((0.0, 0u64), |(u, n), e| {
                (
                    u + e["worst_usd"].as_f64().unwrap(),
                    n + e["requests"].as_u64().unwrap(),
                )
            });
    assert!(n > 0, "no part on record: {log:?}");
    usd / n as f64
}

#[test]
fn a_batch_jobs_budget_counts_the_schemas_tokens_as_online_does() {
    let s = spawn_background(Config::default());
    let per_request = |schema: bool| {
        let f = Fixture::new();
        let output = if schema {
            "schema = \"schemas/ad.json\""
        } else {
            ""
        };
        let j = job(&f, &s, &["Acme", "Zed"], "", output);
        let text = std::fs::read_to_string(&j)
            .unwrap()
            .replace("[run]\n", "[run]\nmode = \"batch\"\nmax_cost_usd = 1\n");
        std::fs::write(&j, text).unwrap();
        ok(&f.run(&["run", "--quiet", &j]));
        let schema_tokens = f
            .run(&["estimate", &j])
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("of which schema"))
            .map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<f64>()
                    .unwrap()
            });
        (batch_worst_per_request(&f), schema_tokens)
    };
    let (plain, none) = per_request(false);
    let (with_schema, tokens) = per_request(true);
    assert_eq!(none, None);
    let tokens = tokens.expect("the estimate names the schema's tokens");
    // gpt-4o-mini at batch prices: $0.075 per million prompt tokens.
    let want = tokens * 0.075 / 1e6;
    assert!(
        ((with_schema - plain) - want).abs() < 1e-12,
        "the schema adds {tokens} prompt tokens to each request's worst case: {plain} → {with_schema}"
    );
}
