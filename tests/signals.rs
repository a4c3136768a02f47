//! Ctrl-C: the requests in flight finish, exit 130, and the rerun resumes.

use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn ctrl_c_finishes_in_flight_rows_exits_130_and_the_rerun_resumes() {
    let (s, f, job) = slow_job(200, 40);
    let child = f
        .cmd(&["run", job.to_str().unwrap(), "--concurrency", "4"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.stats().requests < 6 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let r = ran(child.wait_with_output().unwrap());
    assert_eq!(r.code, 130, "{}", r.stderr);
    let sent = s.stats().requests;
    let recs = f.records();
    // Every request that went out was let finish and written.
    assert_eq!(recs.len() as u64, sent, "{}", r.stderr);
    assert!(sent < 40);
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(f.records().len(), 40);
    assert_eq!(s.stats().requests, 40, "no row sent twice");
}
