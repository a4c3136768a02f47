//! What a job reads from an object store, fetched to the working folder (`{work}/in/…`) and
//! read from there by the same code that reads local files. A fetched object is kept with its
//! ETag beside it, so a second pass or a rerun fetches only what changed.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use object_store::ObjectStore;
use tokio::io::AsyncWriteExt;

use super::{block_on, err, store_for, work_dir, Url};
use crate::error::Error;

/// The most objects a folder or glob of inputs (Parquet part files, a template folder) may
/// hold: a prefix that lists more is almost surely not what was meant.
pub const MAX_OBJECTS: usize = 100_000;

/// The local copy of one object, fetched if it is not there or changed.
pub fn fetch(s: &str) -> Result<PathBuf, Error> {
    let url = Url::parse(s)?;
    let local = url.local_under(&work_dir().join("in"));
    block_on(async move { fetch_one(&url, &local).await.map(|_| local) })
}

/// The bytes of a small object (a schema, an image), refused past `max` bytes before they are
/// read.
pub fn read(s: &str, max: u64) -> Result<Vec<u8>, Error> {
    let url = Url::parse(s)?;
    block_on(async move {
        let store = store_for(&url)?;
        let key = url.object_key();
        let meta = store
            .head(&key)
            .await
            .map_err(|e| err(&url, "cannot read", &e))?;
        if meta.size > max {
            return Err(Error::Other(format!(
                "{url}: {} bytes, over the limit of {max}",
                meta.size
            )));
        }
        let got = store
            .get(&key)
            .await
            .map_err(|e| err(&url, "cannot read", &e))?;
        let bytes = got
            .bytes()
            .await
            .map_err(|e| err(&url, "cannot read", &e))?;
        Ok(bytes.to_vec())
    })
}

/// A folder (`s3://b/data/`) or a glob (`s3://b/data/*.parquet`) of objects, fetched into
/// the matching local folder; returns the local folder, or the local glob when one was given.
pub fn fetch_many(s: &str) -> Result<PathBuf, Error> {
    let url = Url::parse(s)?;
    let root = work_dir().join("in");
    let local = url.local_under(&root);
    let objects = block_on({
        let url = url.clone();
        async move { list_matching(&url).await }
    })?;
    if objects.is_empty() {
        return Err(Error::Other(format!("{url} matches no object")));
    }
    block_on({
        let root = root.clone();
        async move {
            for o in objects {
                let local = o.local_under(&root);
                fetch_one(&o, &local).await?;
            }
            Ok::<_, Error>(())
        }
    })?;
    Ok(local)
}

/// The objects a folder or glob URL names, sorted by key. A key with no wildcard is a folder
/// (every object under it).
pub async fn list_matching(url: &Url) -> Result<Vec<Url>, Error> {
    let store = store_for(url)?;
    let wild = url.key.find(['*', '?', '[']);
    let prefix = match wild {
        Some(i) => url.key[..i]
            .rsplit_once('/')
            .map_or("", |(d, _)| d)
            .to_string(),
        None => url.key.trim_end_matches('/').to_string(),
    };
    let pattern = match wild {
        Some(_) => {
            Some(glob::Pattern::new(&url.key).map_err(|e| Error::Other(format!("`{url}`: {e}")))?)
        }
        None => None,
    };
    let prefix_key = (!prefix.is_empty()).then(|| object_store::path::Path::from(prefix.as_str()));
    let mut listing = store.list(prefix_key.as_ref());
    let mut out = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| err(url, "cannot list", &e))?;
        let key = meta.location.to_string();
        let take = match &pattern {
            Some(p) => p.matches_with(
                &key,
                glob::MatchOptions {
                    require_literal_separator: true,
                    ..Default::default()
                },
            ),
            None => true,
        };
        if take {
            out.push(url.with_key(key));
            if out.len() > MAX_OBJECTS {
                return Err(Error::Other(format!(
                    "{url} names more than {MAX_OBJECTS} objects"
                )));
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Fetches `url` to `local` unless the copy there has the object's ETag: streamed to a
/// temporary file beside it and renamed, so a killed fetch leaves no torn copy.
pub async fn fetch_one(url: &Url, local: &Path) -> Result<(), Error> {
    let store = store_for(url)?;
    let key = url.object_key();
    let meta = store
        .head(&key)
        .await
        .map_err(|e| err(url, "cannot fetch", &e))?;
    let tag_file = crate::ledger::files::sibling(local, ".etag");
    let etag = meta.e_tag.clone().unwrap_or_default();
    if !etag.is_empty()
        && local.is_file()
        && std::fs::read_to_string(&tag_file).is_ok_and(|t| t == etag)
    {
        return Ok(());
    }
    let got = store
        .get(&key)
        .await
        .map_err(|e| err(url, "cannot fetch", &e))?;
    download(url, got, local).await?;
    let _ = std::fs::write(&tag_file, etag);
    Ok(())
}

/// Streams a fetched object's body to `local` (through a temporary file and a rename).
pub(super) async fn download(
    url: &Url,
    got: object_store::GetResult,
    local: &Path,
) -> Result<u64, Error> {
    let io = |p: &Path, e| crate::ledger::journal::io_err(p, e);
    if let Some(d) = local.parent() {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    let tmp = crate::ledger::files::sibling(local, ".part");
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| io(&tmp, e))?;
    let mut body = got.into_stream();
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| err(url, "cannot fetch", &e))?;
        n += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(|e| io(&tmp, e))?;
    }
    f.sync_all().await.map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, local).map_err(|e| io(local, e))?;
    Ok(n)
}

/// Uploads a local file whole to `url`, streamed in parts (flat memory however large it is).
pub async fn upload(local: &Path, url: &Url) -> Result<(), Error> {
    use tokio::io::AsyncReadExt;
    let store = store_for(url)?;
    let io = |e| crate::ledger::journal::io_err(local, e);
    let mut f = tokio::fs::File::open(local).await.map_err(io)?;
    let mut w = super::part_writer(store, url);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await.map_err(|e| {
            Error::Other(format!(
                "cannot write {url}: {}",
                super::scrub(&e.to_string())
            ))
        })?;
    }
    w.shutdown().await.map_err(|e| {
        Error::Other(format!(
            "cannot write {url}: {}",
            super::scrub(&e.to_string())
        ))
    })?;
    Ok(())
}

/// Whether an object exists.
pub async fn exists(url: &Url) -> Result<bool, Error> {
    let store = store_for(url)?;
    match store.head(&url.object_key()).await {
        Ok(_) => Ok(true),
        Err(e) if super::is_not_found(&e) => Ok(false),
        Err(e) => Err(err(url, "cannot look up", &e)),
    }
}
