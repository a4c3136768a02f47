//! A run whose output is on an object store: the store's lock taken, the journal pulled into
//! the local mirror, checkpointed on a thread of its own while the run goes, and the finished
//! output published.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::lock::{Beat, StoreLock};
use super::mirror::{Mirror, Pulled};
use super::{block_on, Url};
use crate::error::Error;

/// `[output] checkpoint_s`'s default and bounds.
pub const DEFAULT_CHECKPOINT: Duration = Duration::from_secs(10);
pub const MIN_CHECKPOINT: Duration = Duration::from_millis(500);
pub const MAX_CHECKPOINT: Duration = Duration::from_secs(600);
/// `[output] lock_stale_s`'s default: six checkpoints at the default interval.
pub const DEFAULT_STALE: Duration = Duration::from_secs(60);

/// A job's output on a store: its URL and local mirror, and the other files written beside
/// it (CSV, Parquet) with their URLs.
#[derive(Debug, Clone)]
pub struct RemoteOutput {
    pub url: Url,
    pub local: PathBuf,
    pub extra: Vec<(PathBuf, Url)>,
    pub checkpoint: Duration,
    pub stale: Duration,
}

/// A run holding a store output's lock.
pub struct Session {
    remote: RemoteOutput,
    mirror: Arc<tokio::sync::Mutex<Mirror>>,
    lock: Arc<tokio::sync::Mutex<Option<StoreLock>>>,
    lost: Arc<AtomicBool>,
}

impl Session {
    /// Takes the lock (waiting out a stale one) and pulls the journal.
    pub fn open(remote: &RemoteOutput) -> Result<Session, Error> {
        let lock = {
            let (u, stale) = (remote.url.with_suffix(".lock"), remote.stale);
            block_on(async move { StoreLock::acquire(&u, stale).await })?
        };
        let mut mirror = Mirror::new(remote.url.clone(), remote.local.clone());
        let pulled = block_on(async move { mirror.pull().await.map(|p| (p, mirror)) });
        let (pulled, mirror) = match pulled {
            Ok(p) => p,
            Err(e) => {
                block_on(lock.release());
                return Err(e);
            }
        };
        if let Pulled::Rebuilt(n) = pulled {
            if n > 0 {
                tracing::info!("{}: the journal rebuilt from {n} objects", remote.url);
            }
        }
        Ok(Session {
            remote: remote.clone(),
            mirror: Arc::new(tokio::sync::Mutex::new(mirror)),
            lock: Arc::new(tokio::sync::Mutex::new(Some(lock))),
            lost: Arc::default(),
        })
    }

    /// The journal as the store holds it, pulled into the mirror without the lock: for
    /// `status` and the dry run, which only read.
    pub fn view(remote: &RemoteOutput) -> Result<(), Error> {
        let mut mirror = Mirror::new(remote.url.clone(), remote.local.clone());
        block_on(async move { mirror.pull().await.map(|_| ()) })
    }

    pub fn url(&self) -> &Url {
        &self.remote.url
    }

    /// Whether another run took the lock over (this one must not publish).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// One checkpoint: the journal's new lines as a piece, then the lock renewed. `Ok(false)`
    /// when the lock was lost.
    pub fn tick(&self) -> Result<bool, Error> {
        let (mirror, lock, lost) = (self.mirror.clone(), self.lock.clone(), self.lost.clone());
        block_on(async move {
            let mut lock = lock.lock().await;
            let Some(l) = lock.as_mut() else {
                return Ok(false);
            };
            // Renewed first: a run that lost its lock must not write another piece.
            match l.renew().await {
                Ok(()) => {}
                Err(Beat::Lost) => {
                    lost.store(true, Ordering::SeqCst);
                    *lock = None;
                    return Ok(false);
                }
                Err(Beat::Failed(e)) => tracing::warn!("{e}; tried again at the next checkpoint"),
            }
            mirror.lock().await.checkpoint().await?;
            Ok(true)
        })
    }

    /// Checkpoints every `checkpoint` on a thread of its own until the returned guard is
    /// dropped; `on_lost` is called if the lock is taken over.
    pub fn checkpointing(self: &Arc<Self>, on_lost: impl Fn() + Send + 'static) -> Ticker {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (s, me) = (stop.clone(), self.clone());
        let every = self.remote.checkpoint;
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || loop {
                let (m, cv) = &*s;
                let g = m.lock().unwrap();
                let (g, _) = cv.wait_timeout_while(g, every, |stop| !*stop).unwrap();
                if *g {
                    return;
                }
                drop(g);
                match me.tick() {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(
                            "{}: another run took the lock over; stopping without publishing",
                            me.remote.url
                        );
                        on_lost();
                        return;
                    }
                    Err(e) => tracing::warn!(
                        "checkpoint failed: {e}; tried again in {} s",
                        every.as_secs_f64()
                    ),
                }
            })
            .ok();
        Ticker { stop, thread }
    }

    /// The finished output published: snapshot, the output's own object, its companions, the
    /// CSV and Parquet. Refused when the lock was lost.
    pub fn publish(&self) -> Result<(), Error> {
        if self.lost() {
            return Err(Error::Other(format!(
                "{}: another run took the lock over; this run's records are in its pieces, \
                 not published",
                self.remote.url
            )));
        }
        let (mirror, extra) = (self.mirror.clone(), self.remote.extra.clone());
        block_on(async move { mirror.lock().await.publish(&extra).await })
    }

    /// Releases the lock (if still held).
    pub fn release(&self) {
        let lock = self.lock.clone();
        block_on(async move {
            if let Some(l) = lock.lock().await.take() {
                l.release().await;
            }
        });
    }
}

/// Stops the checkpoint thread when dropped (and waits for a checkpoint under way).
pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
