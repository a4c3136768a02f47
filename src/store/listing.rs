//! Outputs on a store named by a glob (`s3://b/out/blog.shard-*.jsonl`): finished ones and
//! those a run is still checkpointing, each pulled into a local view for `merge` and `status`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use futures::StreamExt;

use super::mirror::Mirror;
use super::{block_on, err, store_for, work_dir, Url};
use crate::error::Error;

/// The outputs a URL (a glob, or one output) names: an object ending `.jsonl` that is not a
/// companion, or a `.ckpt/` folder of pieces whose output is not finished yet.
pub fn outputs(s: &str) -> Result<Vec<Url>, Error> {
    let url = Url::parse(s)?;
    block_on(async move { outputs_of(&url).await })
}

async fn outputs_of(url: &Url) -> Result<Vec<Url>, Error> {
    let wild = url.key.find(['*', '?', '[']);
    let dir = match wild {
        Some(i) => &url.key[..i],
        None => url.key.as_str(),
    };
    let dir = dir.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    let pattern =
        glob::Pattern::new(&url.key).map_err(|e| Error::Other(format!("`{url}`: {e}")))?;
    let store = store_for(url)?;
    let prefix = (!dir.is_empty()).then(|| object_store::path::Path::from(dir.as_str()));
    let mut list = store.list(prefix.as_ref());
    let mut names = BTreeSet::new();
    while let Some(m) = list.next().await {
        let m = m.map_err(|e| err(url, "cannot list", &e))?;
        let key = m.location.to_string();
        let name = match key.split_once(".ckpt/") {
            Some((output, _)) => output.to_string(),
            None => key,
        };
        let opts = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        if pattern.matches_with(&name, opts) && is_output(&name) {
            names.insert(name);
        }
    }
    if names.is_empty() {
        return Err(Error::Other(format!("`{url}` matches no output")));
    }
    Ok(names.into_iter().map(|k| url.with_key(k)).collect())
}

fn is_output(name: &str) -> bool {
    crate::ledger::files::is_output_name(name)
}

/// Whether a run holds the output's lock.
pub fn locked(url: &Url) -> Result<bool, Error> {
    let lock = url.with_suffix(".lock");
    block_on(async move { super::stage::exists(&lock).await })
}

/// A local, read-only view of a store output (journal as the store holds it, and its
/// companions), under the working folder's `view/`.
pub fn view(url: &Url) -> Result<PathBuf, Error> {
    let local = url.local_under(&work_dir().join("view"));
    let mut m = Mirror::new(url.clone(), local.clone());
    block_on(async move { m.pull().await.map(|_| ()) })?;
    Ok(local)
}
