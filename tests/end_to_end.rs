//! A job end to end: ordered outputs, usage and cost, every request field and message reaching
//! the API, and the base URL from the environment.

use crate::util::*;

#[test]
fn a_job_runs_end_to_end_with_ordered_outputs_usage_and_cost() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(30));
    let job = f.job(
        "data.csv",
        "Say {{ text }}",
        "temperature = 0.3\ntop_p = 0.9\npresence_penalty = 0.1\nfrequency_penalty = 0.2\nstop = [\"END\"]\nseed = 5\nuser = \"u1\"\nextra = { logit_bias = { \"50256\" = -100 } }",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap(), "--concurrency", "8"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs.len(), 30);
    for (i, rec) in recs.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(
            rec["row"], n,
            "the JSONL output is in input order after the run"
        );
        assert_eq!(rec["id"], format!("{n}"));
        assert_eq!(rec["status"], "ok");
        assert_eq!(rec["input"]["text"], format!("row {n}"));
        assert_eq!(rec["completion"], format!("echo: Say row {n}"));
        assert_eq!(rec["finish_reason"], "stop");
        assert_eq!(rec["model"], "gpt-4o-mini");
        let u = &rec["usage"];
        assert_eq!(
            u["total_tokens"],
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        let want = (u["prompt_tokens"].as_f64().unwrap() * 0.15
            + u["completion_tokens"].as_f64().unwrap() * 0.60)
            / 1e6;
        assert!((rec["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12);
        assert_eq!(rec["attempts"], 1);
        assert_eq!(rec["fingerprint"].as_str().unwrap().len(), 32);
    }
    // Every request field of the job reached the API, `extra` flattened in.
    let body = &s.requests()[0];
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(body["temperature"], 0.3);
    assert_eq!(body["top_p"], 0.9);
    assert_eq!(body["max_tokens"], 20);
    assert_eq!(body["presence_penalty"], 0.1);
    assert_eq!(body["frequency_penalty"], 0.2);
    assert_eq!(body["stop"], serde_json::json!(["END"]));
    assert_eq!(body["seed"], 5);
    assert_eq!(body["user"], "u1");
    assert_eq!(body["logit_bias"]["50256"], -100);
    // CSV in input order: input columns, then completion, tokens, cost, status, error.
    let csv = std::fs::read_to_string(f.path("out/result.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,text,completion,prompt_tokens,completion_tokens,total_tokens,cost_usd,status,error"
    );
    assert!(lines
        .next()
        .unwrap()
        .starts_with("r1,row 1,echo: Say row 1,"));
    assert_eq!(csv.lines().count(), 31);
    let sum = f.summary();
    assert_eq!(sum["rows_ok"], 30);
    assert_eq!(sum["rows_failed"], 0);
    let total_cost: f64 = recs.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((sum["cost_usd"].as_f64().unwrap() - total_cost).abs() < 1e-9);
    assert!(
        r.stderr.contains("rows ok"),
        "summary table on stderr: {}",
        r.stderr
    );
}

#[test]
fn multi_turn_few_shot_and_names_reach_the_api() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(1));
    f.write("templates/q.tera", "Q: {{ text }}");
    f.write(
        "job.toml",
        format!(
            r#"
[input]
path = "data.csv"
[[messages]]
role = "system"
content = "Answer in one word."
[[messages]]
role = "user"
name = "example_user"
content = "Q: sky colour?"
[[messages]]
role = "assistant"
content = "Blue."
[[messages]]
role = "user"
template = "q.tera"
[model]
name = "gpt-4o"
base_url = "{}"
[output]
path = "out/result.jsonl"
"#,
            s.base_url()
        ),
    );
    let r = f.run(&["run", "job.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let m = &s.requests()[0]["messages"];
    assert_eq!(m.as_array().unwrap().len(), 4);
    assert_eq!(m[1]["name"], "example_user");
    assert_eq!(m[2]["role"], "assistant");
    assert_eq!(m[3]["content"], "Q: row 1");
}

#[test]
fn base_url_comes_from_openai_base_url_when_the_job_has_none() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    let job = f.job("data.csv", "{{ text }}", "", "", "UNUSED");
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("base_url = \"UNUSED\"\n", ""),
    )
    .unwrap();
    let r = ran(f
        .cmd(&["run", job.to_str().unwrap()])
        .env("OPENAI_BASE_URL", s.base_url())
        .output()
        .unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 2);
}

/// `prompt_cache_key = "auto"`: one key for every row of a prefix, a new one when the shared
/// prefix changes, none with "off" (nor, by default, on a server other than OpenAI's own); and
/// since it is a routing hint outside the fingerprint, turning it on re-pays nothing.
#[test]
fn openai_rows_that_share_a_prefix_carry_one_prompt_cache_key() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(4));
    let keys = |from: usize| -> Vec<Option<String>> {
        s.requests()[from..]
            .iter()
            .map(|b| b["prompt_cache_key"].as_str().map(String::from))
            .collect()
    };
    let job = f.job("data.csv", "Say {{ text }}", "", "", &s.base_url());
    ok(&f.run(&["run", job.to_str().unwrap()]));
    assert_eq!(
        keys(0),
        vec![None; 4],
        "off by default away from api.openai.com"
    );

    // Turned on: the finished rows are not sent again; new rows carry one key.
    f.write("data.csv", csv_rows(8));
    let text = std::fs::read_to_string(&job).unwrap();
    let on = text.replace(
        "max_tokens = 20\n",
        "max_tokens = 20\nprompt_cache_key = \"auto\"\n",
    );
    std::fs::write(&job, &on).unwrap();
    ok(&f.run(&["run", job.to_str().unwrap()]));
    assert_eq!(s.requests().len(), 8, "the four done rows are not re-paid");
    let auto = keys(4);
    let first = auto[0].clone().expect("a key");
    assert!(first.starts_with("pm-job-"), "{first}");
    assert!(
        auto.iter().all(|k| k.as_deref() == Some(first.as_str())),
        "{auto:?}"
    );

    // Another system prompt is another prefix: another key.
    f.write("data.csv", csv_rows(9));
    std::fs::write(&job, on.replace("You are terse.", "You are brief.")).unwrap();
    ok(&f.run(&["run", job.to_str().unwrap()]));
    let other = keys(8);
    assert!(
        other
            .iter()
            .all(|k| k.is_some() && k.as_ref() != Some(&first)),
        "{other:?}"
    );
}
