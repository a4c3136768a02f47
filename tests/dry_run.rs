//! The dry run (`run --dry-run`, `estimate`): exact prompt tokens and the cost bound, nothing
//! sent.

use crate::util::*;

#[test]
fn dry_run_counts_tokens_exactly_and_sends_nothing() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(40));
    let job = f.job("data.csv", "Hello {{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", "--dry-run", job.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
    // o200k_base: "system"=1 "You are terse."=4 "user"=1, "Hello row N" = 3 (N<10) or 3; cookbook overhead 3+3+3.
    let bpe = tiktoken_rs::o200k_base().unwrap();
    let mut want = 0;
    for i in 1..=40 {
        want += 3
            + 3
            + bpe.encode_with_special_tokens("system").len()
            + bpe.encode_with_special_tokens("You are terse.").len();
        want += 3
            + bpe.encode_with_special_tokens("user").len()
            + bpe
                .encode_with_special_tokens(&format!("Hello row {i}"))
                .len();
    }
    assert!(
        r.stdout.contains(&format!("prompt tokens     {want} ")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("rows              40"), "{}", r.stdout);
    let bound = (want as f64 * 0.15 + 40.0 * 20.0 * 0.60) / 1e6;
    assert!(
        r.stdout.contains(&format!("${bound:.6}")),
        "bound {bound:.6}: {}",
        r.stdout
    );
    let est = f.run(&["estimate", job.to_str().unwrap()]);
    assert_eq!(est.stdout, r.stdout);
}
