//! Cost as billed (cached and reasoning tokens, `[pricing]`), unknown models, and the budget
//! (`--max-cost`).

use crate::util::*;

#[test]
fn cost_uses_cached_and_reasoning_tokens_as_billed() {
    let s = server();
    let f = Fixture::new();
    f.write("data.jsonl", "{\"t\": \"FAULT:usage=1000,200,400,50\"}\n");
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("gpt-4o-mini", "gpt-4o-2024-08-06"),
    )
    .unwrap();
    assert_eq!(f.run(&["run", job.to_str().unwrap()]).code, 0);
    let rec = &f.records()[0];
    assert_eq!(rec["usage"]["cached_tokens"], 400);
    assert_eq!(rec["usage"]["reasoning_tokens"], 50);
    let want = (600.0 * 2.50 + 400.0 * 1.25 + 200.0 * 10.0) / 1e6;
    assert!(
        (rec["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
        "{}",
        rec["cost_usd"]
    );
    // [pricing] overrides the table.
    let f2 = Fixture::new();
    f2.write("data.jsonl", "{\"t\": \"FAULT:usage=1000,200,400,50\"}\n");
    let job = f2.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let text = std::fs::read_to_string(&job).unwrap()
        + "\n[pricing]\ninput = 1.0\ncached_input = 0.5\noutput = 2.0\n";
    std::fs::write(&job, text).unwrap();
    assert_eq!(f2.run(&["run", job.to_str().unwrap()]).code, 0);
    let c = f2.records()[0]["cost_usd"].as_f64().unwrap();
    assert!((c - (600.0 + 200.0 + 400.0) / 1e6).abs() < 1e-12, "{c}");
}

#[test]
fn an_unknown_model_gets_null_cost_and_one_warning() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("gpt-4o-mini", "acme-llm-7b"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0);
    assert!(f.records().iter().all(|r| r["cost_usd"].is_null()));
    assert_eq!(
        r.stderr.matches("no price known").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(f.summary()["cost_usd"].is_null());
}

#[test]
fn the_budget_stops_dispatching_before_it_could_be_exceeded() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(50));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    // gpt-4o-mini: 20 max tokens × $0.60/1M + ~20 prompt × $0.15/1M ≈ $0.000015 a row at worst.
    let r = f.run(&[
        "run",
        job.to_str().unwrap(),
        "--max-cost",
        "0.0001",
        "--concurrency",
        "1",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("budget"), "{}", r.stderr);
    let recs = f.records();
    assert!(!recs.is_empty() && recs.len() < 50);
    let spent: f64 = recs.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!(spent <= 0.0001);
}
