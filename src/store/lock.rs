//! The lock of an output on an object store: an object created only if none is there
//! (`If-None-Match: *`), its body rewritten at every checkpoint only if it is still ours
//! (`If-Match` on its ETag). A lock nobody has rewritten for the stale timeout is taken over,
//! through the same conditional write, so of two pods that find it stale one wins.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::{PutMode, PutOptions, PutPayload, UpdateVersion};
use serde_json::json;

use super::{err, store_for, Url};
use crate::error::Error;

/// The stale timeout's bounds: a lock is rewritten every checkpoint, so the timeout must
/// leave room for a few of them; past an hour a dead pod's shard waits too long.
pub const MIN_STALE: Duration = Duration::from_secs(1);
pub const MAX_STALE: Duration = Duration::from_secs(3600);

/// A lock this process holds.
#[derive(Debug)]
pub struct StoreLock {
    url: Url,
    version: UpdateVersion,
    beats: u64,
    started: u64,
}

/// Why a rewrite failed: someone else took the lock (the run must stop), or the store did not
/// answer (tried again at the next checkpoint).
#[derive(Debug)]
pub enum Beat {
    Lost,
    Failed(Error),
}

impl StoreLock {
    /// Takes the lock at `url`. A lock held by a live run (its body changes within `stale`)
    /// is an error naming the holder; one left by a dead run is taken over once it has not
    /// changed for `stale`, watched by this process's own clock (so pods' clocks need not
    /// agree).
    pub async fn acquire(url: &Url, stale: Duration) -> Result<StoreLock, Error> {
        let store = store_for(url)?;
        let key = url.object_key();
        let started = now_s();
        let mut watched: Option<(String, Instant)> = None;
        loop {
            match Self::put_as(url, PutMode::Create, started).await {
                Ok(lock) => return Ok(lock),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => return Err(err(url, "cannot take the lock", &e)),
            }
            let (meta, holder) = match store.get(&key).await {
                Ok(g) => {
                    let meta = g.meta.clone();
                    let bytes = g.bytes().await.unwrap_or_default();
                    (meta, holder_of(&bytes))
                }
                // Released between the two calls: try to create it again.
                Err(e) if super::is_not_found(&e) => continue,
                Err(e) => return Err(err(url, "cannot read the lock", &e)),
            };
            let tag = meta.e_tag.clone().unwrap_or_default();
            match &watched {
                Some((t, since)) if *t == tag && since.elapsed() >= stale => {
                    // The same version for the whole timeout: its run is dead. Replaced only
                    // if it is still that version, so of two takers one wins.
                    let version = UpdateVersion {
                        e_tag: meta.e_tag.clone(),
                        version: meta.version.clone(),
                    };
                    return match Self::put_as(url, PutMode::Update(version), started).await {
                        Ok(lock) => {
                            tracing::warn!(
                                "took over the lock {url}: {holder} has not renewed it for {} s",
                                stale.as_secs()
                            );
                            Ok(lock)
                        }
                        Err(object_store::Error::Precondition { .. }) => {
                            Err(held(url, &holder, "another run took it over first"))
                        }
                        Err(e) => Err(err(url, "cannot take over the lock", &e)),
                    };
                }
                Some((t, _)) if *t == tag => {}
                Some(_) => return Err(held(url, &holder, "it is renewed: that run is alive")),
                None => {
                    tracing::info!(
                        "{url} is locked by {holder}; it is taken over if it is not renewed \
                         within {} s",
                        stale.as_secs()
                    );
                    watched = Some((tag, Instant::now()));
                }
            }
            let poll = (stale / 6).clamp(Duration::from_millis(200), Duration::from_secs(5));
            tokio::time::sleep(poll).await;
        }
    }

    /// Writes the lock's body with `mode` (create, or replace a given version).
    async fn put_as(url: &Url, mode: PutMode, started: u64) -> object_store::Result<StoreLock> {
        let store = store_for(url).map_err(|e| object_store::Error::Generic {
            store: "lock",
            source: e.to_string().into(),
        })?;
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let r = store
            .put_opts(&url.object_key(), body(started, 0), opts)
            .await?;
        Ok(StoreLock {
            url: url.clone(),
            version: UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            },
            beats: 0,
            started,
        })
    }

    /// Rewrites the lock (a heartbeat), only if it is still the version this process wrote.
    pub async fn renew(&mut self) -> Result<(), Beat> {
        let store = store_for(&self.url).map_err(Beat::Failed)?;
        self.beats += 1;
        let opts = PutOptions {
            mode: PutMode::Update(self.version.clone()),
            ..Default::default()
        };
        match store
            .put_opts(&self.url.object_key(), body(self.started, self.beats), opts)
            .await
        {
            Ok(r) => {
                self.version = UpdateVersion {
                    e_tag: r.e_tag,
                    version: r.version,
                };
                Ok(())
            }
            Err(object_store::Error::Precondition { .. })
            | Err(object_store::Error::NotFound { .. }) => Err(Beat::Lost),
            Err(e) => Err(Beat::Failed(err(&self.url, "cannot renew the lock", &e))),
        }
    }

    /// Deletes the lock if it is still this process's.
    pub async fn release(self) {
        let Ok(store) = store_for(&self.url) else {
            return;
        };
        let key = self.url.object_key();
        if let Ok(meta) = store.head(&key).await {
            if meta.e_tag == self.version.e_tag {
                let _ = store.delete(&key).await;
            }
        }
    }
}

fn held(url: &Url, holder: &str, why: &str) -> Error {
    Error::Locked {
        path: url.to_string().into(),
        since: format!("{holder}; {why}"),
    }
}

/// The lock's body: who holds it, and a counter so every renewal has a new ETag.
fn body(started: u64, beat: u64) -> PutPayload {
    // A pod's name is its host name (`HOSTNAME` is often a shell variable, not exported).
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let v = json!({
        "host": host,
        "pid": std::process::id(),
        "started": started,
        "beat": beat,
        "at": now_s(),
    });
    PutPayload::from(serde_json::to_vec(&v).unwrap_or_default())
}

fn holder_of(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    format!(
        "host {} pid {}",
        v["host"].as_str().filter(|h| !h.is_empty()).unwrap_or("?"),
        v["pid"].as_u64().map_or("?".into(), |p| p.to_string())
    )
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
