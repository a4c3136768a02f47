//! Logs where nobody sees colour: a run whose stderr is a pipe writes no ANSI escape codes.

use crate::util::*;

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let s = spawn_background(Config::default());
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    // NO_COLOR unset: the pipe alone must turn colour off.
    let r = ran(f
        .cmd(&["run", job.to_str().unwrap()])
        .env_remove("NO_COLOR")
        .output()
        .unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(" INFO "),
        "no log line to check: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("\x1b["), "{:?}", r.stderr);
}
