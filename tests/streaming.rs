//! Streamed responses, assembled with their usage.

use crate::util::*;

#[test]
fn streaming_responses_are_assembled_with_usage() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(5));
    let job = f.job(
        "data.csv",
        "stream {{ text }}",
        "stream = true",
        "",
        &s.base_url(),
    );
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let recs = f.records();
    assert_eq!(recs[4]["completion"], "echo: stream row 5");
    assert!(recs[4]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(s.requests()[0]["stream_options"]["include_usage"], true);
}
