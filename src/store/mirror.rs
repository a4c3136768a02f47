//! An output on an object store, mirrored on local disk while a run writes it.
//!
//! A store cannot append, so the journal (append-only on local disk, as for any output) goes
//! to the store as numbered pieces under `OUTPUT.ckpt/`: `GGGGGG.SSSSSSSS.jsonl`, where a
//! piece with `SSSSSSSS = 0` is a snapshot (the whole journal) and each later one holds the
//! complete lines appended since the piece before. A new generation starts with a snapshot
//! (at the end of every run, or when the journal was rewritten); older generations are then
//! deleted. A fresh pod rebuilds the journal from the newest snapshot and its pieces, so what
//! a dead pod can have been paid for and not kept is what it answered since its last piece.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{err, is_not_found, stage, store_for, Url};
use crate::error::Error;

/// `x.jsonl` + `.etag` → `x.jsonl.etag`.
pub fn sibling(p: &Path, suffix: &str) -> PathBuf {
    crate::ledger::files::sibling(p, suffix)
}

/// One piece of an output's checkpoint.
#[derive(Debug, Clone)]
struct Piece {
    gen: u32,
    seq: u32,
    url: Url,
}

/// Where the local journal stands against the store: the last piece it matches and how many of
/// its bytes the pieces hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct State {
    url: String,
    gen: u32,
    seq: u32,
    offset: u64,
    ino: u64,
}

/// An output URL and its local mirror.
#[derive(Debug)]
pub struct Mirror {
    url: Url,
    local: PathBuf,
    state: State,
}

/// What `pull` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pulled {
    /// The local journal was already at the store's last piece (it may hold more).
    Kept,
    /// Rebuilt from the store: this many pieces (a snapshot or the finished output counts).
    Rebuilt(usize),
}

impl Mirror {
    pub fn new(url: Url, local: PathBuf) -> Mirror {
        let state = State {
            url: url.to_string(),
            ..State::default()
        };
        Mirror { url, local, state }
    }

    fn state_file(&self) -> PathBuf {
        sibling(&self.local, ".ckpt.json")
    }

    fn piece_url(&self, gen: u32, seq: u32) -> Url {
        self.url
            .with_suffix(&format!(".ckpt/{gen:06}.{seq:08}.jsonl"))
    }

    async fn pieces(&self) -> Result<Vec<Piece>, Error> {
        let dir = self.url.with_suffix(".ckpt/");
        let store = store_for(&self.url)?;
        let prefix = object_store::path::Path::from(dir.key.trim_end_matches('/'));
        let mut list = store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(m) = list.next().await {
            let m = m.map_err(|e| err(&dir, "cannot list", &e))?;
            let name = m.location.filename().unwrap_or_default().to_string();
            let Some((gen, rest)) = name.split_once('.') else {
                continue;
            };
            let Some(seq) = rest.strip_suffix(".jsonl") else {
                continue;
            };
            if let (Ok(gen), Ok(seq)) = (gen.parse(), seq.parse()) {
                out.push(Piece {
                    gen,
                    seq,
                    url: self.url.with_key(m.location.to_string()),
                });
            }
        }
        out.sort_by_key(|p| (p.gen, p.seq));
        Ok(out)
    }

    /// Makes the local journal what the store holds: kept as it is when it is at the store's
    /// last piece (a restarted container on the same disk), else rebuilt from the newest
    /// snapshot (or the finished output) and the pieces after it. Companions that hold
    /// records or money (stale, prev, spend, stamp) are fetched when rebuilt.
    pub async fn pull(&mut self) -> Result<Pulled, Error> {
        let pieces = self.pieces().await?;
        let head = pieces.iter().filter(|p| p.seq == 0).map(|p| p.gen).max();
        let gen = head.unwrap_or(0);
        let chain: Vec<&Piece> = pieces
            .iter()
            .filter(|p| p.gen == gen && (p.seq > 0 || head.is_some()))
            .collect();
        let last_seq = chain.last().map_or(0, |p| p.seq);
        if let Some(st) = self.load_state() {
            let len = std::fs::metadata(&self.local).map_or(0, |m| m.len());
            if st.url == self.state.url && st.gen == gen && st.seq == last_seq && len >= st.offset {
                self.state = st;
                return Ok(Pulled::Kept);
            }
        }
        let mut sources: Vec<Url> = Vec::new();
        if head.is_none() && stage::exists(&self.url).await? {
            // An output finished before it was ever checkpointed (or put there by hand).
            sources.push(self.url.clone());
        }
        sources.extend(chain.iter().map(|p| p.url.clone()));
        if sources.is_empty() {
            // Nothing on the store: a local journal (if any) is kept whole and goes up with
            // the first checkpoint; none is made.
            self.state = State {
                url: self.url.to_string(),
                gen,
                seq: last_seq,
                offset: 0,
                ino: ino_of(&self.local),
            };
            return Ok(Pulled::Rebuilt(0));
        }
        let n = self.rebuild(&sources).await?;
        self.state = State {
            url: self.url.to_string(),
            gen,
            seq: last_seq,
            offset: n,
            ino: ino_of(&self.local),
        };
        self.save_state()?;
        for c in &COMPANIONS {
            let local = companion_path(&self.local, c);
            let url = self.url_of(&local);
            match store_for(&url)?.get(&url.object_key()).await {
                Ok(got) => {
                    stage::download(&url, got, &local).await?;
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(err(&url, "cannot fetch", &e)),
            }
        }
        Ok(Pulled::Rebuilt(sources.len()))
    }

    /// The sources concatenated into the local journal (through a temporary file and a rename).
    async fn rebuild(&self, sources: &[Url]) -> Result<u64, Error> {
        use tokio::io::AsyncWriteExt;
        let io = |p: &Path, e| crate::ledger::journal::io_err(p, e);
        if let Some(d) = self.local.parent() {
            std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
        }
        let tmp = sibling(&self.local, ".rebuild");
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io(&tmp, e))?;
        let mut n = 0u64;
        for u in sources {
            let got = store_for(u)?
                .get(&u.object_key())
                .await
                .map_err(|e| err(u, "cannot fetch", &e))?;
            let mut body = got.into_stream();
            let mut last = b'\n';
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| err(u, "cannot fetch", &e))?;
                if let Some(&b) = chunk.last() {
                    last = b;
                }
                n += chunk.len() as u64;
                f.write_all(&chunk).await.map_err(|e| io(&tmp, e))?;
            }
            if last != b'\n' {
                // A finished output put there by hand may lack its last newline.
                f.write_all(b"\n").await.map_err(|e| io(&tmp, e))?;
                n += 1;
            }
        }
        f.sync_all().await.map_err(|e| io(&tmp, e))?;
        drop(f);
        crate::ledger::files::rename_durably(&tmp, &self.local)?;
        Ok(n)
    }

    /// Sends what the journal gained since the last piece: a new piece of its complete lines,
    /// or a snapshot when the journal was rewritten (compacted, moved by `--fresh`). Returns
    /// the bytes sent.
    pub async fn checkpoint(&mut self) -> Result<u64, Error> {
        let Ok(mut f) = std::fs::File::open(&self.local) else {
            return Ok(0);
        };
        // One open file, its own size and inode: a rename over the path in between cannot
        // mix two files.
        let meta = f
            .metadata()
            .map_err(|e| crate::ledger::journal::io_err(&self.local, e))?;
        let ino = ino_of_meta(&meta);
        if ino != self.state.ino || meta.len() < self.state.offset {
            return self.snapshot_from(f).await;
        }
        if meta.len() == self.state.offset {
            return Ok(0);
        }
        let (gen, seq) = (self.state.gen, self.state.seq + 1);
        let url = self.piece_url(gen, seq);
        let sent = send_lines(&mut f, self.state.offset, meta.len(), &url, &self.local).await?;
        if sent > 0 {
            self.state.seq = seq;
            self.state.offset += sent;
            self.save_state()?;
        }
        Ok(sent)
    }

    /// A new generation: the whole journal as its snapshot, then the older generations
    /// deleted.
    pub async fn snapshot(&mut self) -> Result<u64, Error> {
        match std::fs::File::open(&self.local) {
            Ok(f) => self.snapshot_from(f).await,
            Err(_) => Ok(0),
        }
    }

    async fn snapshot_from(&mut self, mut f: std::fs::File) -> Result<u64, Error> {
        // Records a rewrite moved out of the journal (`--fresh`'s `.prev`, compaction's
        // `.stale`) go up before the snapshot that no longer holds them.
        for c in &COMPANIONS {
            let local = companion_path(&self.local, c);
            if local.is_file() {
                stage::upload(&local, &self.url_of(&local)).await?;
            }
        }
        let meta = f
            .metadata()
            .map_err(|e| crate::ledger::journal::io_err(&self.local, e))?;
        let gen = self.state.gen + 1;
        let url = self.piece_url(gen, 0);
        let sent = send_lines(&mut f, 0, meta.len(), &url, &self.local).await?;
        if sent == 0 && meta.len() > 0 {
            return Ok(0);
        }
        if sent == 0 {
            // An empty journal still gets its (empty) snapshot: it says "nothing, as of now".
            let store = store_for(&url)?;
            store
                .put(&url.object_key(), object_store::PutPayload::default())
                .await
                .map_err(|e| err(&url, "cannot write", &e))?;
        }
        self.state = State {
            url: self.url.to_string(),
            gen,
            seq: 0,
            offset: sent,
            ino: ino_of_meta(&meta),
        };
        self.save_state()?;
        // Older generations are now covered by this snapshot; a failed delete leaves a piece
        // that `pull` ignores (it is older than the newest snapshot).
        let store = store_for(&self.url)?;
        for p in self.pieces().await? {
            if p.gen < gen {
                let _ = store.delete(&p.url.object_key()).await;
            }
        }
        Ok(sent)
    }

    /// The finished output, as the user reads it: the journal (compacted) copied to the
    /// output's own key, and every companion that exists locally uploaded whole.
    pub async fn publish(&mut self, extra: &[(PathBuf, Url)]) -> Result<(), Error> {
        // A rerun that changed nothing leaves the journal its generation's snapshot: not
        // sent again (at ten million rows it is gigabytes).
        let unchanged = std::fs::metadata(&self.local).is_ok_and(|m| {
            self.state.seq == 0
                && self.state.gen > 0
                && ino_of_meta(&m) == self.state.ino
                && m.len() == self.state.offset
        });
        if !unchanged {
            self.snapshot().await?;
        }
        let snap = self.piece_url(self.state.gen, 0);
        let store = store_for(&self.url)?;
        if store
            .copy(&snap.object_key(), &self.url.object_key())
            .await
            .is_err()
        {
            // Some stores cap a server-side copy (S3: 5 GB); upload it instead.
            stage::upload(&self.local, &self.url).await?;
        }
        for c in PUBLISHED {
            let local = companion_path(&self.local, c);
            if local.is_file() {
                let url = self.url_of(&local);
                stage::upload(&local, &url).await?;
            }
        }
        for (local, url) in extra {
            if local.is_file() {
                stage::upload(local, url).await?;
            }
        }
        Ok(())
    }

    /// The URL of a file beside the local journal (a companion).
    fn url_of(&self, local: &Path) -> Url {
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = self.url.key.rsplit_once('/').map_or("", |(d, _)| d);
        let key = if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        };
        self.url.with_key(key)
    }

    fn load_state(&self) -> Option<State> {
        let text = std::fs::read(self.state_file()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn save_state(&self) -> Result<(), Error> {
        let text = serde_json::to_vec(&self.state).unwrap_or_default();
        crate::ledger::files::replace_bytes(&self.state_file(), &text)
    }
}

/// Companions that hold records, money or the job's identity: fetched with the journal and
/// published with it.
const COMPANIONS: [Companion; 4] = [
    Companion::Kind("stale"),
    Companion::Kind("prev"),
    Companion::Suffix(".spend.json"),
    Companion::Suffix(".job.json"),
];

/// Made from the records at the end of a run: published only.
const PUBLISHED: &[Companion] = &[
    Companion::Kind("rejected"),
    Companion::Suffix(".summary.json"),
    Companion::Suffix(".report.html"),
];

#[derive(Debug, Clone, Copy)]
enum Companion {
    /// `x.KIND.jsonl` (`rejected` is `x.rejected.txt`).
    Kind(&'static str),
    /// `x.jsonl` + suffix.
    Suffix(&'static str),
}

fn companion_path(output: &Path, c: &Companion) -> PathBuf {
    let files = crate::ledger::files::Files::new(output);
    match c {
        Companion::Kind("rejected") => files.rejected(),
        Companion::Kind(k) => crate::ledger::files::companion(output, k),
        Companion::Suffix(s) => sibling(output, s),
    }
}

/// Uploads the complete lines of `f` between `from` and `to` to `url` (streamed; memory stays
/// at one part). Returns the bytes sent: up to the last newline, so a line being written is
/// left for the next piece.
async fn send_lines(
    f: &mut std::fs::File,
    from: u64,
    to: u64,
    url: &Url,
    path: &Path,
) -> Result<u64, Error> {
    use tokio::io::AsyncWriteExt;
    let io = |e| crate::ledger::journal::io_err(path, e);
    // The last newline before `to`, read backwards a block at a time.
    let mut end = to;
    let mut block = vec![0u8; 64 * 1024];
    let cut = loop {
        if end <= from {
            break from;
        }
        let start = end.saturating_sub(block.len() as u64).max(from);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        f.read_exact(&mut block[..n]).map_err(io)?;
        if let Some(i) = block[..n].iter().rposition(|&b| b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if cut == from {
        return Ok(0);
    }
    let store = store_for(url)?;
    let mut w = super::part_writer(store, url);
    f.seek(SeekFrom::Start(from)).map_err(io)?;
    let mut left = cut - from;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n]).map_err(io)?;
        w.write_all(&buf[..n])
            .await
            .map_err(|e| write_err(url, &e))?;
        left -= n as u64;
    }
    w.shutdown().await.map_err(|e| write_err(url, &e))?;
    Ok(cut - from)
}

fn write_err(url: &Url, e: &std::io::Error) -> Error {
    Error::Other(format!(
        "cannot write {url}: {}",
        super::scrub(&e.to_string())
    ))
}

fn ino_of(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| ino_of_meta(&m))
}

#[cfg(unix)]
fn ino_of_meta(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn ino_of_meta(_: &std::fs::Metadata) -> u64 {
    0
}
