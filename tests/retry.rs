//! Retries within a run: transient faults until they succeed, a row that keeps failing, and
//! bad requests that fail their row at once.

use crate::util::*;

#[test]
fn transient_faults_are_retried_until_they_succeed() {
    let s = server();
    let f = Fixture::new();
    f.write(
        "data.jsonl",
        [
            r#"{"t": "FAULT:500:2"}"#,
            r#"{"t": "FAULT:503:1"}"#,
            r#"{"t": "FAULT:429:2"}"#,
            r#"{"t": "FAULT:reset:1"}"#,
            r#"{"t": "FAULT:hang:1"}"#,
            r#"{"t": "FAULT:badjson:1"}"#,
            r#"{"t": "FAULT:empty:1"}"#,
            r#"{"t": "fine"}"#,
        ]
        .join("\n"),
    );
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    // The hang must trip the client's timeout, not the test's patience.
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("timeout_s = 5", "timeout_s = 0.5"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    let attempts: Vec<u64> = recs
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, vec![3, 2, 3, 2, 2, 2, 2, 1]);
    assert!(recs.iter().all(|r| r["status"] == "ok"));
    let sum = f.summary();
    assert_eq!(sum["retries"], 9);
    assert_eq!(sum["rate_limited"], 2);
}

#[test]
fn a_row_that_keeps_failing_is_recorded_with_its_error_after_max_retries() {
    let s = server();
    let f = Fixture::new();
    // The other row answers while the first one is being retried, so the endpoint is known to
    // be up (a success before the row began would look like the last one before an outage;
    // on a loaded machine the second row's task can even finish before the first one starts).
    // It answers after 300 ms: within the least the two retry delays can add up to (250 ms +
    // 500 ms with backoff's jitter), so the row's last failure never comes before the success
    // and no outage probe adds an attempt.
    f.write(
        "data.jsonl",
        "{\"t\": \"FAULT:500\"}\n{\"t\": \"ok FAULT:slow=300\"}\n",
    );
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    std::fs::write(
        &job,
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("max_retries = 4", "max_retries = 2"),
    )
    .unwrap();
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1, "some rows failed: {}", r.stderr);
    let recs = f.records();
    assert_eq!(recs[0]["status"], "error");
    assert_eq!(recs[0]["attempts"], 3);
    assert_eq!(recs[0]["error"]["kind"], "server");
    assert_eq!(recs[0]["error"]["status"], 500);
    assert!(recs[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("The server had an error"));
    assert_eq!(recs[1]["status"], "ok");
}

#[test]
fn bad_request_fails_the_row_at_once_with_the_api_message() {
    let s = server();
    let f = Fixture::new();
    f.write(
        "data.jsonl",
        "{\"t\": \"FAULT:400\"}\n{\"t\": \"FAULT:404\"}\n{\"t\": \"FAULT:422\"}\n{\"t\": \"ok\"}\n",
    );
    let job = f.job("data.jsonl", "{{ t }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    let recs = f.records();
    for (i, status) in [400, 404, 422].iter().enumerate() {
        assert_eq!(recs[i]["status"], "error");
        assert_eq!(recs[i]["attempts"], 1, "not retried");
        assert_eq!(recs[i]["error"]["kind"], "bad_request");
        assert_eq!(recs[i]["error"]["status"], *status);
        assert!(!recs[i]["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(recs[3]["status"], "ok");
    assert_eq!(s.stats().requests, 4);
}
