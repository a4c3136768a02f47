//! `merge` and `status` over outputs on an object store: each output pulled into a local view,
//! a store target locked, written in its mirror and published.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Error;
use crate::ledger::stamp::Stamp;
use crate::store::session::{RemoteOutput, Session, DEFAULT_CHECKPOINT, DEFAULT_STALE};
use crate::store::{self, Url};

/// The outputs named on the command line as local paths: a store URL (or glob) becomes the
/// views of the outputs it names, each with its URL for messages.
/// With `unlocked`, an output whose run holds its lock is refused (merge only what ended).
pub(super) fn expand(
    args: &[String],
    unlocked: bool,
) -> Result<Vec<(PathBuf, Option<Url>)>, Error> {
    let (urls, paths): (Vec<&String>, Vec<&String>) = args.iter().partition(|a| store::is_url(a));
    let mut out: Vec<(PathBuf, Option<Url>)> = if paths.is_empty() {
        Vec::new()
    } else {
        let paths: Vec<String> = paths.into_iter().cloned().collect();
        crate::output::merge::expand(&paths)?
            .into_iter()
            .map(|p| (p, None))
            .collect()
    };
    for a in urls {
        if let Some(path) = a.strip_prefix("file://") {
            out.extend(
                crate::output::merge::expand(&[path.to_string()])?
                    .into_iter()
                    .map(|p| (p, None)),
            );
            continue;
        }
        for u in store::listing::outputs(a)? {
            if unlocked && store::listing::locked(&u)? {
                return Err(Error::Locked {
                    path: u.to_string().into(),
                    since: "a run holds its lock: merge when the shards have finished".into(),
                });
            }
            let local = store::listing::view(&u)?;
            out.push((local, Some(u)));
        }
    }
    Ok(out)
}

/// The job loaded, with a store output's journal pulled into its mirror (read only, no
/// lock): what `status`, the dry run and `export` count against.
pub(super) fn load_viewed(
    file: &Path,
    ov: &crate::job::Overrides,
) -> Result<crate::job::Job, Error> {
    let job = crate::job::Job::load(file, ov)?;
    if let Some(r) = &job.remote {
        Session::view(r)?;
    }
    Ok(job)
}

/// A merge's target on a store: locked and pulled before the merge, published after it.
pub(super) struct Target {
    session: Arc<Session>,
    pub local: PathBuf,
    pub csv: Option<PathBuf>,
    pub parquet: Option<PathBuf>,
}

impl Target {
    /// `output` (a URL) with its CSV and Parquet (URLs or local paths, or the CSV the job
    /// named, placed beside the target).
    pub fn open(
        output: &str,
        csv: Option<&Path>,
        parquet: Option<&Path>,
        first_input: &Path,
    ) -> Result<Target, Error> {
        let url = Url::parse(output)?;
        let work = store::work_dir().join("out");
        let local = url.local_under(&work);
        let mut extra = Vec::new();
        let mut place = |p: &Path| -> Result<PathBuf, Error> {
            match p.to_str().filter(|s| store::is_url(s)) {
                Some(s) => {
                    let u = Url::parse(s)?;
                    let l = u.local_under(&work);
                    extra.push((l.clone(), u));
                    Ok(l)
                }
                None => Ok(p.to_path_buf()),
            }
        };
        let csv = match csv {
            Some(c) => Some(place(c)?),
            // The job's CSV, beside the target as it was beside the shards.
            None => match Stamp::read(&crate::ledger::files::sibling(first_input, ".job.json"))?
                .and_then(|s| s.csv)
            {
                Some(rel) => {
                    let key = join_key(&url.key, &rel.to_string_lossy());
                    Some(place(Path::new(&url.with_key(key).to_string()))?)
                }
                None => None,
            },
        };
        let parquet = parquet.map(&mut place).transpose()?;
        let remote = RemoteOutput {
            url,
            local: local.clone(),
            extra,
            checkpoint: DEFAULT_CHECKPOINT,
            stale: DEFAULT_STALE,
        };
        let session = Arc::new(Session::open(&remote)?);
        Ok(Target {
            session,
            local,
            csv,
            parquet,
        })
    }

    pub fn url(&self) -> &Url {
        self.session.url()
    }

    /// The merged output published; the lock released either way.
    pub fn publish(self) -> Result<(), Error> {
        let r = self.session.publish();
        self.session.release();
        r
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.session.release();
    }
}

/// `out/blog.jsonl` + `blog.csv` → `out/blog.csv` (`..` taken lexically).
fn join_key(output_key: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = output_key.split('/').collect();
    parts.pop();
    for p in rel.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stamps_relative_csv_lands_beside_the_target() {
        assert_eq!(
            super::join_key("out/blog.jsonl", "blog.csv"),
            "out/blog.csv"
        );
        assert_eq!(
            super::join_key("out/blog.jsonl", "../csv/blog.csv"),
            "csv/blog.csv"
        );
        assert_eq!(super::join_key("blog.jsonl", "blog.csv"), "blog.csv");
    }
}
