//! RPM and TPM pacing against the fake server's limits, and the limit learned when none is set.

use crate::util::*;

/// Runs `rows` rows at concurrency 16 against a server with `limits`, the job paced by
/// `run_extra`; returns the server's stats once every row is in the output.
fn paced_run(
    limits: Config,
    rows: usize,
    model_extra: &str,
    run_extra: &str,
) -> fake_openai::Stats {
    let s = spawn_background(limits);
    let f = Fixture::new();
    f.write("data.csv", csv_rows(rows));
    let job = f.job(
        "data.csv",
        "{{ text }}",
        model_extra,
        run_extra,
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap(), "--concurrency", "16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), rows);
    s.stats()
}

#[test]
fn rpm_pacing_keeps_a_job_at_its_quota_free_of_429s() {
    // The server allows 600/min over a 1 s window (10 per second); the job asks for 600 rpm.
    let limits = Config {
        rpm: Some(600),
        window_s: 1.0,
        ..Default::default()
    };
    assert_eq!(
        paced_run(limits, 25, "", "rpm = 600").rate_limited,
        0,
        "paced under the limit"
    );
}

#[test]
fn without_a_configured_rpm_the_limit_is_learned_and_429s_stay_rare() {
    let s = spawn_background(Config {
        rpm: Some(1200),
        window_s: 1.0,
        ..Default::default()
    });
    let f = Fixture::new();
    f.write("data.csv", csv_rows(60));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap(), "--concurrency", "50"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 60);
    let st = s.stats();
    assert!(st.rate_limited * 10 <= st.requests, "{st:?}");
}

#[test]
fn tpm_pacing_keeps_a_token_bound_job_free_of_429s() {
    // 1 s window of 2,000 tokens (120k/min); each request is ~ 15 prompt + 100 max tokens
    // (`max_completion_tokens` wins over the fixture's `max_tokens`).
    let limits = Config {
        tpm: Some(120_000),
        window_s: 1.0,
        ..Default::default()
    };
    let stats = paced_run(limits, 40, "max_completion_tokens = 100", "tpm = 100000");
    assert_eq!(stats.rate_limited, 0);
}
