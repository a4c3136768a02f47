//! Job-level errors (exit 2, with their location, before any request), `render` and
//! `validate`.

use crate::util::*;

#[test]
fn job_level_errors_exit_2_with_location_before_any_request() {
    let s = server();
    let f = Fixture::new();
    f.write("data.csv", csv_rows(2));
    // Missing input.
    let job = f.job("nope.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nope.csv"), "{}", r.stderr);
    // Template syntax error: file, line.
    f.write("templates/broken.tera", "line one\n{{ text \n");
    let job = f.job("data.csv", "{{ text }}", "", "", &s.base_url());
    let r = f.run(&["run", job.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("broken.tera") && r.stderr.contains("--> 3:1"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(f.path("templates/broken.tera")).unwrap();
    // Unknown template.
    f.write(
        "job2.toml",
        std::fs::read_to_string(&job).unwrap().replace(
            "content = \"\"\"{{ text }}\"\"\"",
            "template = \"absent.tera\"",
        ),
    );
    let r = f.run(&["run", "job2.toml"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("absent.tera") && r.stderr.contains("messages[1].template"),
        "{}",
        r.stderr
    );
    // TOML error: line and column.
    f.write("job3.toml", "[input]\npath = \"data.csv\"\n[model\n");
    let r = f.run(&["run", "job3.toml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("job3.toml:3:"), "{}", r.stderr);
    // A typo in a key is caught, not ignored.
    f.write(
        "job4.toml",
        std::fs::read_to_string(&job)
            .unwrap()
            .replace("max_tokens", "max_tokenz"),
    );
    let r = f.run(&["run", "job4.toml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("max_tokenz"), "{}", r.stderr);
    assert_eq!(s.stats().requests, 0);
}

#[test]
fn render_prints_one_rows_messages() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    let job = f.job(
        "data.csv",
        "Hi {{ text | upper }}",
        "",
        "",
        "http://127.0.0.1:9/v1",
    );
    let r = f.run(&["render", job.to_str().unwrap(), "--row", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("--- system\nYou are terse.\n--- user\nHi ROW 2\n"),
        "{}",
        r.stdout
    );
    let r = f.run(&["render", job.to_str().unwrap(), "--row", "9"]);
    assert_eq!(r.code, 2);
}

#[test]
fn validate_lists_every_problem_with_its_location() {
    let f = Fixture::new();
    f.write("data.csv", csv_rows(3));
    f.write("templates/t.tera", "{{ text }} {{ title }} {% for x in tags %}{{ x }}{% endfor %} {{ loop_free }} {{ tone | default(value=1) }}");
    f.write(
        "job.toml",
        r#"
[input]
path = "data.csv"
[[messages]]
role = "user"
template = "t.tera"
[[messages]]
role = "user"
content = "{{ body }}{% if text is defined %}{% endif %}"
[model]
name = "gpt-4o"
base_url = "http://127.0.0.1:9/v1"
[output]
path = "out.jsonl"
"#,
    );
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    for v in ["title", "tags", "body", "loop_free"] {
        assert!(
            r.stderr.contains(&format!("variable `{v}`")),
            "{v}: {}",
            r.stderr
        );
    }
    assert!(!r.stderr.contains("variable `text`"));
    assert!(!r.stderr.contains("variable `x`"));
    assert!(
        !r.stderr.contains("variable `tone`"),
        "a default makes it optional"
    );
    assert!(r.stderr.contains("t.tera"));
    f.write("templates/t.tera", "{{ text }}");
    f.write(
        "job.toml",
        std::fs::read_to_string(f.path("job.toml"))
            .unwrap()
            .replace("{{ body }}", "{{ id }}"),
    );
    let r = f.run(&["validate", "job.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
