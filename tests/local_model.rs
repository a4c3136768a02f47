//! The embedded model, for real: the default model must have been fetched
//! (`promptmill fetch-model`; scripts/test.sh does it first).

use std::time::Duration;

use serde_json::Value;

use crate::util::*;

fn local_job(f: &Fixture, rows: usize, extra: &str) -> std::path::PathBuf {
    let mut data = String::from("id,text\n");
    let texts = [
        "The cat sat on the mat.",
        "Rain is expected tomorrow.",
        "The shop opens at nine.",
        "Water boils at 100 degrees.",
    ];
    for i in 1..=rows {
        data.push_str(&format!("r{i},\"{} ({i})\"\n", texts[i % texts.len()]));
    }
    f.write("data.csv", data);
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "data.csv"
id = "id"
[[messages]]
role = "user"
content = "Translate into French: {{{{ text }}}}"
[model]
provider = "local"
temperature = 0.0
seed = 42
max_tokens = 8
{extra}
[run]
concurrency = 2
[output]
path = "out/result.jsonl"
"#
        ),
    )
}

/// Checks that the dry run counts the prompt tokens the run's records say; its output.
fn estimate_counts_the_prompts_of(f: &Fixture, job: &str, recs: &[Value]) -> String {
    let prompt_total: u64 = recs
        .iter()
        .map(|r| r["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    let est = f.run(&["estimate", job]);
    assert_eq!(est.code, 0, "{}", est.stderr);
    assert!(
        est.stdout
            .contains(&format!("prompt tokens     {prompt_total} ")),
        "{prompt_total}: {}",
        est.stdout
    );
    est.stdout
}

#[test]
fn the_local_model_generates_with_real_usage_and_zero_cost() {
    let f = Fixture::new();
    let job = local_job(&f, 4, "");
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 4);
    for rec in &recs {
        assert_eq!(rec["status"], "ok");
        assert!(!rec["completion"].as_str().unwrap().is_empty(), "{rec}");
        let u = &rec["usage"];
        let c = u["completion_tokens"].as_u64().unwrap();
        assert!((1..=8).contains(&c), "{u}");
        if c == 8 {
            assert_eq!(rec["finish_reason"], "length");
        }
        assert_eq!(rec["cost_usd"], 0.0);
    }
    // The dry run counts with the same tokenizer and template: the same prompt tokens.
    estimate_counts_the_prompts_of(&f, job.to_str().unwrap(), &recs);
}

#[test]
fn the_local_model_is_deterministic_at_temperature_0_with_a_seed() {
    let f = Fixture::new();
    let job = local_job(&f, 3, "");
    // One sequence at a time: batched decoding sums floats in another order, which can
    // flip a near-tie between two tokens (see the README).
    let j = job.to_str().unwrap();
    assert_eq!(f.run(&["run", j, "--concurrency", "1"]).code, 0);
    let first: Vec<Value> = f
        .records()
        .iter()
        .map(|r| r["completion"].clone())
        .collect();
    assert_eq!(f.run(&["run", "--fresh", j, "--concurrency", "1"]).code, 0);
    let second: Vec<Value> = f
        .records()
        .iter()
        .map(|r| r["completion"].clone())
        .collect();
    assert_eq!(first, second);
}

#[test]
fn rows_start_from_the_prompt_prefix_other_rows_decoded() {
    let f = Fixture::new();
    let job = local_job(&f, 6, "");
    let j = job.to_str().unwrap();
    let r = f.run(&["run", j]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cached = |recs: &[Value]| -> Vec<u64> {
        recs.iter()
            .map(|r| r["usage"]["cached_tokens"].as_u64().unwrap_or(0))
            .collect()
    };
    let recs = f.records();
    let on = cached(&recs);
    // The first two rows start together; every later one begins with the template's
    // opening ("Translate into French:") already decoded by an earlier row.
    assert!(on[2..].iter().all(|&c| c > 0), "{on:?}");
    for (rec, c) in recs.iter().zip(&on) {
        assert!(
            *c < rec["usage"]["prompt_tokens"].as_u64().unwrap(),
            "{rec}"
        );
    }
    assert_eq!(f.summary()["cached_tokens"], on.iter().sum::<u64>());

    local_job(&f, 6, "cache_prompt = false");
    let r = f.run(&["run", "--fresh", j]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(cached(&f.records()), vec![0; 6]);
    assert_eq!(f.summary()["cached_tokens"], 0);
}

#[test]
fn a_killed_local_run_resumes_without_redoing_finished_rows() {
    let f = Fixture::new();
    let job = local_job(&f, 24, "");
    let mut child = f
        .cmd(&["run", "--quiet", job.to_str().unwrap()])
        .spawn()
        .unwrap();
    let out = f.path("out/result.jsonl");
    wait_for_lines(&out, 3, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    let before = read_jsonl_lenient(&out) as u64;
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 24);
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["row"], i as u64 + 1);
    }
    let sum = f.summary();
    assert_eq!(sum["rows_skipped"].as_u64().unwrap(), before);
    assert_eq!(sum["rows_ok"].as_u64().unwrap(), 24 - before);
}

/// Every top-level keyword the converter writes: lengths, an enum, an integer range, a
/// nested object, a bounded array, an optional property.
const AD_SCHEMA: &str = r#"{
      "type": "object",
      "properties": {
        "headline": {"type": "string", "maxLength": 40},
        "language": {"enum": ["en", "fr", "de"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "meta": {"type": "object", "properties": {"short": {"type": "boolean"}}, "required": ["short"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        "note": {"type": ["string", "null"], "maxLength": 20}
      },
      "required": ["headline", "language", "score", "meta", "tags"],
      "additionalProperties": false
    }"#;

/// The local job with `model` in place of its sampling lines and `output` added to
/// [output].
fn local_job_with(f: &Fixture, rows: usize, model: &str, output: &str) -> String {
    let job = local_job(f, rows, "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("temperature = 0.0\nseed = 42\nmax_tokens = 8\n", model);
    std::fs::write(&job, format!("{text}{output}\n")).unwrap();
    job.to_str().unwrap().to_string()
}

#[test]
fn a_schema_job_on_the_local_model_writes_data_that_follows_the_schema() {
    let f = Fixture::new();
    f.write("ad.json", AD_SCHEMA);
    let job = local_job_with(
        &f,
        4,
        "temperature = 0.7\nseed = 42\nmax_tokens = 160\n",
        "schema = \"ad.json\"\ncsv = \"out/result.csv\"",
    );
    let r = f.run(&["run", &job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let schema: Value = serde_json::from_str(AD_SCHEMA).unwrap();
    let recs = f.records();
    assert_eq!(recs.len(), 4);
    for rec in &recs {
        assert_eq!(rec["status"], "ok", "{rec}");
        assert!(rec.get("invalid_attempts").is_none(), "{rec}");
        assert_eq!(rec["finish_reason"], "stop", "{rec}");
        let text = rec["completion"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).expect("the completion is JSON");
        assert_eq!(rec["data"], parsed);
        assert!(jsonschema::is_valid(&schema, &parsed), "{parsed}");
        // Properties come in the schema's order.
        let keys: Vec<&str> = parsed
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let order = ["headline", "language", "score", "meta", "tags", "note"];
        let mut want: Vec<&str> = order.to_vec();
        want.retain(|k| keys.contains(k));
        assert_eq!(keys, want);
    }
    // One CSV column per property, in schema order.
    let mut rdr = csv::Reader::from_path(f.path("out/result.csv")).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    let at: Vec<usize> = ["headline", "language", "score", "meta", "tags", "note"]
        .iter()
        .map(|n| header.iter().position(|h| h == n).expect(n))
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{header:?}");
    // The model never reads the schema (a grammar holds it): the dry run adds none of it.
    let est = estimate_counts_the_prompts_of(&f, &job, &recs);
    assert!(!est.contains("of which schema"), "{est}");
}

#[test]
fn a_schema_the_local_grammar_cannot_hold_stops_the_job_before_it_runs() {
    let f = Fixture::new();
    f.write(
        "ad.json",
        r#"{"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}"#,
    );
    let job = local_job_with(&f, 1, "", "schema = \"ad.json\"");
    for cmd in ["validate", "run"] {
        let r = f.run(&[cmd, &job]);
        assert_eq!(r.code, 2, "{cmd}: {}", r.stderr);
        assert!(
            r.stderr.contains("output.schema")
                && r.stderr.contains("/properties/code")
                && r.stderr.contains("`pattern`"),
            "{cmd}: {}",
            r.stderr
        );
    }
    assert!(!f.path("out/result.jsonl").exists());
}

#[test]
fn n_on_the_local_model_keeps_every_variant_and_sums_their_tokens() {
    let f = Fixture::new();
    let max_tokens = 12;
    let job = local_job_with(
        &f,
        4,
        &format!("temperature = 1.0\nseed = 42\nmax_tokens = {max_tokens}\nn = 2\n"),
        "",
    );
    let r = f.run(&["run", &job]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 4);
    let mut distinct = 0;
    let mut both_capped = 0;
    for rec in &recs {
        assert_eq!(rec["status"], "ok", "{rec}");
        let v = rec["variants"].as_array().expect("variants");
        assert_eq!(v.len(), 2, "{rec}");
        assert_eq!(v[0]["completion"], rec["completion"]);
        if v[0]["completion"] != v[1]["completion"] {
            distinct += 1;
        }
        let u = &rec["usage"];
        let c = u["completion_tokens"].as_u64().unwrap();
        assert!(c <= 2 * max_tokens, "{u}");
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + c
        );
        if v.iter().all(|v| v["finish_reason"] == "length") {
            // Both ran to the cap: both are counted.
            assert_eq!(c, 2 * max_tokens, "{u}");
            both_capped += 1;
        }
    }
    assert!(
        distinct >= 3,
        "seeds seed + i give different variants: {recs:?}"
    );
    assert!(both_capped >= 1, "{recs:?}");
    // The prompt is counted once per row, as the dry run counts it.
    estimate_counts_the_prompts_of(&f, &job, &recs);
}

#[test]
fn a_missing_model_file_says_how_to_get_one() {
    let f = Fixture::new();
    let job = local_job(&f, 1, "path = \"no/such/model.gguf\"");
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("model.gguf") && r.stderr.contains("promptmill fetch-model"),
        "{}",
        r.stderr
    );
    f.write("no/such/model.gguf", "this is not a gguf file at all");
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("promptmill fetch-model"), "{}", r.stderr);
}

#[test]
fn estimate_render_and_status_read_the_vocabulary_and_a_cached_checksum_only() {
    let f = Fixture::new();
    // A model folder of the test's own, so the checksum cache starts empty.
    let models = f.path("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = f.path("models/model.gguf");
    let default = default_model();
    std::fs::copy(&default, &model).unwrap();
    let job = local_job(&f, 2, "");
    let job = job.to_str().unwrap();
    let run = |args: &[&str]| {
        ran(f
            .cmd(args)
            .env("PROMPTMILL_MODEL_DIR", &models)
            .env("PROMPTMILL_LOG", "promptmill=debug")
            .output()
            .unwrap())
    };
    // The job names the default file; point it at the copy.
    let text = std::fs::read_to_string(f.path(job)).unwrap().replace(
        "provider = \"local\"",
        &format!("provider = \"local\"\npath = \"{}\"", model.display()),
    );
    std::fs::write(f.path(job), text).unwrap();

    let r = run(&["run", job]);
    ok(&r);
    assert!(r.stderr.contains("local model loaded"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("checksum of"),
        "hashed the first time: {}",
        r.stderr
    );
    let recs = f.records();
    for cmd in ["estimate", "render", "status"] {
        let r = run(&[cmd, job]);
        ok(&r);
        assert!(
            !r.stderr.contains("local model loaded"),
            "{cmd}: {}",
            r.stderr
        );
        assert!(r.stderr.contains("checksum of"), "{cmd}: {}", r.stderr);
    }
    let r = run(&["estimate", job]);
    assert!(r.stderr.contains("vocabulary only"), "{}", r.stderr);
    // Nothing is left to send: the same fingerprints as the run's.
    assert!(r.stdout.contains("rows to send      0"), "{}", r.stdout);
    // A changed file is hashed again, and is another model: every row is to send again.
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.extend_from_slice(&[0u8; 32]);
    std::fs::write(&model, bytes).unwrap();
    let r = run(&["estimate", job]);
    ok(&r);
    assert!(!r.stderr.contains("checksum of"), "{}", r.stderr);
    assert!(r.stdout.contains("rows to send      2"), "{}", r.stdout);
    assert_eq!(recs.len(), 2);
}

/// The default model as `promptmill fetch-model` caches it.
fn default_model() -> std::path::PathBuf {
    let dir = std::env::var_os("PROMPTMILL_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|c| c.join("promptmill/models"))
        })
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
                .join(".cache/promptmill/models")
        });
    dir.join("smollm2-135m-instruct-q4_1.gguf")
}
