//! `promptmill validate` on the project's own jobs: every example in jobs/ must pass, so a
//! change that breaks one is caught, and a new job is covered by being put there.

use std::path::PathBuf;
use std::process::Command;

use crate::util::*;

/// Every `jobs/*.toml`, listed now rather than named, so no job can be left out.
fn repository_jobs() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("jobs");
    let mut jobs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    jobs.sort();
    jobs
}

#[test]
fn every_job_in_the_repository_validates() {
    let jobs = repository_jobs();
    assert!(jobs.len() >= 5, "only {} jobs found: {jobs:?}", jobs.len());
    // Local jobs want the default model in the cache folder; validate only checks the file
    // is there, so an empty one stands in for it.
    let models = tempfile::tempdir().unwrap();
    std::fs::write(
        models.path().join(promptmill::models::DEFAULT_MODEL_FILE),
        b"",
    )
    .unwrap();
    // Elsewhere than the repository, so no .env of a developer's is read.
    let cwd = tempfile::tempdir().unwrap();
    let mut failed = Vec::new();
    for job in &jobs {
        // A job whose data is on an object store needs the store to validate (its input and
        // templates are fetched): `object_store::the_kubernetes_manifests_run_as_written` runs
        // the repository's one such job, blog_s3.toml, against a local S3 server.
        if std::fs::read_to_string(job).unwrap().contains("\"s3://") {
            assert!(
                job.ends_with("blog_s3.toml"),
                "{} needs a test of its own",
                job.display()
            );
            continue;
        }
        let r = ran(Command::new(env!("CARGO_BIN_EXE_promptmill"))
            .arg("validate")
            .arg(job)
            .current_dir(cwd.path())
            .env("OPENAI_API_KEY", KEY)
            .env("AZURE_OPENAI_API_KEY", KEY)
            .env("ANTHROPIC_API_KEY", KEY)
            .env_remove("ANTHROPIC_BASE_URL")
            .env("GEMINI_API_KEY", KEY)
            .env_remove("GEMINI_BASE_URL")
            .env("PROMPTMILL_MODEL_DIR", models.path())
            .env_remove("OPENAI_BASE_URL")
            .env_remove("PROMPTMILL_LOG")
            .output()
            .unwrap());
        if r.code != 0 {
            failed.push(format!(
                "{} (exit {}):\n{}",
                job.display(),
                r.code,
                r.stderr
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn a_template_field_the_input_lacks_still_fails_validate() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    // `tone` may be missing (it has a default), `audience` may not.
    f.write(
        "templates/t.tera",
        "{{ text }} for {{ audience }}, {{ tone | default(value=\"neutral\") }}",
    );
    f.write(
        "job.toml",
        r#"
[input]
path = "data.csv"
[[messages]]
role = "user"
template = "t.tera"
[model]
name = "gpt-4o-mini"
[output]
path = "out.jsonl"
"#,
    );
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("variable `audience`"), "{}", r.stderr);
    assert!(!r.stderr.contains("variable `tone`"), "{}", r.stderr);
    assert!(r.stderr.contains("1 problem(s)"), "{}", r.stderr);
}
