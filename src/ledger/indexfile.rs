//! The index file `OUTPUT.index`: a cache of the journal's index, never the truth. It says
//! which journal it describes (the journal's length, inode and the hashes of its first and
//! last 64 KB at that length) and carries a checksum; one that is stale, corrupt or absent is
//! rebuilt from the journal, and one that covers a prefix of the journal (records appended
//! since, by a run that was killed) is brought up to date by parsing only what follows.
//!
//! Built by an external sort: the journal's entries are sorted in chunks in memory, spilled
//! to anonymous scratch files, and merged with the old index file in one streaming pass that
//! keeps each key's latest record.
//!
//! Layout: a 128-byte header (u64s, little-endian: magic, keyed by id, journal length, inode,
//! head hash, tail hash, lines, records, spent, unconfirmed, ok rows, ok completion tokens,
//! entries, superseded, unreadable, checksum), the entries (40 bytes each, sorted), the
//! offsets of superseded paid records (8 bytes each), the unreadable lines (line number and
//! offset, 16 bytes each).

use std::fs::File;
use std::hash::Hasher;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use fastbloom::BloomFilter;
use siphasher::sip::SipHasher13;

use crate::error::Error;
use crate::ledger::files::sibling;
use crate::ledger::journal::{self, io_err};
use crate::ledger::runs::{self, FenceBuilder, Table};

use super::index::{cmp_encoded, entry_of, filter_hash, Entry, Index, KEY, PAID, REC, USAGE};
use super::Keying;

const MAGIC: &[u8; 8] = b"PMLIX002";
const HEADER: usize = 128;
/// How much of each end of the journal the header's hashes cover.
const WINDOW: u64 = 64 * 1024;
/// The bloom filter's false-positive rate: 1 row in 100 that is not done reads one block.
const FALSE_POSITIVES: f64 = 0.01;

/// What the header says, besides the counts of the three sections.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Meta {
    by_id: bool,
    journal_len: u64,
    ino: u64,
    head: u64,
    tail: u64,
    lines: u64,
    records: u64,
    spent_usd: f64,
    unconfirmed_usd: f64,
    ok_rows: u64,
    ok_tokens: u64,
}

/// An index file read and checked: its entries mapped, with their filter and fence.
struct Cached {
    meta: Meta,
    file: File,
    n: usize,
    fence: FenceBuilder,
    filter: BloomFilter,
    superseded: Vec<u64>,
    unreadable: Vec<(u64, u64)>,
}

impl Index {
    /// The index of the journal at `path`, from its index file when that is current, else
    /// brought up to date from the journal. `persist`: the caller holds the output's lock, so
    /// it may write the index file (others build theirs in a scratch file).
    pub fn open(path: &Path, keying: Keying, persist: bool) -> Result<Index, Error> {
        open(path, keying, persist)
    }

    /// The index of the journal at `path`, built afresh (its index file neither read nor
    /// written).
    #[cfg(test)]
    pub fn load(path: &Path, keying: Keying) -> Result<Index, Error> {
        build(path, keying, None, None)
    }

    /// Adds the stale file's records as copy sources, so a row deleted from the input and put
    /// back later is not paid for again.
    pub fn with_stale(
        mut self,
        stale: &Path,
        keying: Keying,
        persist: bool,
    ) -> Result<Index, Error> {
        let ix = Index::open(stale, keying, persist)?;
        self.stale = (ix.records > 0).then(|| Box::new(ix));
        Ok(self)
    }
}

fn open(path: &Path, keying: Keying, persist: bool) -> Result<Index, Error> {
    let cache = sibling(path, ".index");
    let (len, ino) = journal_id(path)?;
    let base = match read(&cache, path, keying, len, ino) {
        Ok(c) => c,
        Err(why) => {
            tracing::info!("{}: {why}; it is rebuilt from the journal", cache.display());
            None
        }
    };
    match base {
        Some(c) if c.meta.journal_len == len => into_index(c, &cache),
        _ if len == 0 => Ok(Index::default()),
        base => build(path, keying, base, persist.then_some(cache.as_path())),
    }
}

/// The journal's length and inode (0 and 0 when there is none).
fn journal_id(path: &Path) -> Result<(u64, u64), Error> {
    match std::fs::metadata(path) {
        Ok(m) => Ok((m.len(), inode(&m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, 0)),
        Err(e) => Err(io_err(path, e)),
    }
}

#[cfg(unix)]
fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

/// Hashes of the journal's first and last `WINDOW` bytes up to `len`.
fn journal_hashes(path: &Path, len: u64) -> Result<(u64, u64), Error> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut hash_at = |start: u64, n: u64| -> Result<u64, Error> {
        let mut buf = vec![0u8; n as usize];
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_err(path, e))?;
        f.read_exact(&mut buf).map_err(|e| io_err(path, e))?;
        let mut h = SipHasher13::new();
        h.write(&buf);
        Ok(h.finish())
    };
    let n = len.min(WINDOW);
    Ok((hash_at(0, n)?, hash_at(len - n, n)?))
}

fn into_index(c: Cached, at: &Path) -> Result<Index, Error> {
    let m = c.meta;
    let entries = Table::new(&c.file, at, HEADER as u64, REC, c.fence)?;
    debug_assert_eq!(entries.len(), c.n);
    for (number, _) in c.unreadable.iter().take(5) {
        tracing::warn!("line {number} of the output is not a record; it is kept aside");
    }
    Ok(Index {
        entries,
        filter: Some(c.filter),
        superseded_paid: c.superseded,
        unreadable: c.unreadable,
        records: m.records,
        spent_usd: m.spent_usd,
        unconfirmed_usd: m.unconfirmed_usd,
        mean_completion_tokens: (m.ok_rows > 0).then(|| m.ok_tokens as f64 / m.ok_rows as f64),
        stale: None,
    })
}

/// Reads the index file and checks it against the journal: `Ok(None)` when there is none,
/// `Err(why)` when it does not describe this journal or is damaged.
fn read(
    cache: &Path,
    journal: &Path,
    keying: Keying,
    len: u64,
    ino: u64,
) -> Result<Option<Cached>, String> {
    let file = match File::open(cache) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut r = BufReader::with_capacity(256 * 1024, file.try_clone().map_err(|e| e.to_string())?);
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h)
        .map_err(|_| "shorter than its header")?;
    let word = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if &h[..8] != MAGIC {
        return Err("not an index file of this version".into());
    }
    let meta = meta_of(&h);
    if meta.by_id != keying.by_id {
        return Err("made for another keying (the job's id column changed)".into());
    }
    if meta.journal_len > len || meta.ino != ino || meta.journal_len == 0 {
        return Err("made for another state of the output".into());
    }
    let (head, tail) = journal_hashes(journal, meta.journal_len).map_err(|e| e.to_string())?;
    if (head, tail) != (meta.head, meta.tail) {
        return Err("made for another state of the output".into());
    }
    let (n, n_sup, n_unr) = (word(12) as usize, word(13) as usize, word(14) as usize);
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size != (HEADER + n * REC + n_sup * 8 + n_unr * 16) as u64 {
        return Err("its length does not match its header".into());
    }
    let mut body = SipHasher13::new();
    let mut fence = FenceBuilder::new(REC);
    let mut filter = new_filter(n);
    let mut rec = [0u8; REC];
    let mut last = [0u8; KEY];
    for i in 0..n {
        r.read_exact(&mut rec).map_err(|e| e.to_string())?;
        body.write(&rec);
        if (i > 0 && rec[..KEY] <= last[..]) || Entry::decode(&rec).offset >= meta.journal_len {
            return Err(format!("entry {i} is out of order or out of the journal"));
        }
        last.copy_from_slice(&rec[..KEY]);
        fence.push(&rec);
        filter.insert_hash(filter_hash(rec[..16].try_into().expect("16 bytes")));
    }
    let mut read_u64 = |r: &mut BufReader<File>| -> Result<u64, String> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).map_err(|e| e.to_string())?;
        body.write(&b);
        Ok(u64::from_le_bytes(b))
    };
    let superseded = (0..n_sup)
        .map(|_| read_u64(&mut r))
        .collect::<Result<_, _>>()?;
    let unreadable = (0..n_unr)
        .map(|_| Ok((read_u64(&mut r)?, read_u64(&mut r)?)))
        .collect::<Result<_, String>>()?;
    if checksum(&h, body.finish()) != word(15) {
        return Err("its checksum does not match (damaged)".into());
    }
    Ok(Some(Cached {
        meta,
        file,
        n,
        fence,
        filter,
        superseded,
        unreadable,
    }))
}

fn new_filter(n: usize) -> BloomFilter {
    BloomFilter::with_false_pos(FALSE_POSITIVES).expected_items(n.max(1))
}

fn checksum(header: &[u8; HEADER], body: u64) -> u64 {
    let mut h = SipHasher13::new();
    h.write(&header[..120]);
    h.write_u64(body);
    h.finish()
}

fn meta_of(h: &[u8; HEADER]) -> Meta {
    let word = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Meta {
        by_id: word(1) != 0,
        journal_len: word(2),
        ino: word(3),
        head: word(4),
        tail: word(5),
        lines: word(6),
        records: word(7),
        spent_usd: f64::from_bits(word(8)),
        unconfirmed_usd: f64::from_bits(word(9)),
        ok_rows: word(10),
        ok_tokens: word(11),
    }
}

fn header_of(m: &Meta, counts: [u64; 3]) -> [u8; HEADER] {
    let words = [
        u64::from_le_bytes(*MAGIC),
        u64::from(m.by_id),
        m.journal_len,
        m.ino,
        m.head,
        m.tail,
        m.lines,
        m.records,
        m.spent_usd.to_bits(),
        m.unconfirmed_usd.to_bits(),
        m.ok_rows,
        m.ok_tokens,
        counts[0],
        counts[1],
        counts[2],
    ];
    let mut h = [0u8; HEADER];
    for (i, w) in words.iter().enumerate() {
        h[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    h
}

/// What parsing the journal gathers besides the entries.
struct Gathered {
    meta: Meta,
    runs: Vec<Box<dyn Read>>,
    entries: usize,
    superseded: Vec<u64>,
    unreadable: Vec<(u64, u64)>,
}

/// Builds the index of the journal at `path`: from `base` (an index file of a prefix of it)
/// on, or from the start. `dest`: the index file to write (else a scratch file).
fn build(
    path: &Path,
    keying: Keying,
    base: Option<Cached>,
    dest: Option<&Path>,
) -> Result<Index, Error> {
    let (_, ino) = journal_id(path)?;
    let mut g = Gathered {
        meta: Meta {
            by_id: keying.by_id,
            ino,
            ..Meta::default()
        },
        runs: Vec::new(),
        entries: 0,
        superseded: Vec::new(),
        unreadable: Vec::new(),
    };
    let mut from = 0;
    if let Some(c) = base {
        from = c.meta.journal_len;
        g.meta = Meta { ino, ..c.meta };
        g.entries = c.n;
        g.superseded = c.superseded;
        g.unreadable = c.unreadable;
        let mut f = c.file;
        f.seek(SeekFrom::Start(HEADER as u64))
            .map_err(|e| io_err(path, e))?;
        g.runs.push(Box::new(f.take((c.n * REC) as u64)));
    }
    gather(path, keying, from, &mut g)?;
    if g.meta.journal_len > 0 {
        (g.meta.head, g.meta.tail) = journal_hashes(path, g.meta.journal_len)?;
    }
    write(path, g, dest)
}

/// Parses the journal from byte `from` into sorted runs of entries.
fn gather(path: &Path, keying: Keying, from: u64, g: &mut Gathered) -> Result<(), Error> {
    let mut chunk: Vec<[u8; REC]> = Vec::with_capacity(runs::CHUNK.min(1024));
    let first_line = g.meta.lines;
    let mut end = from;
    journal::for_each_line_from(path, from, first_line, |offset, number, bytes| {
        end = offset + bytes.len() as u64;
        g.meta.lines = number;
        let line = match journal::parse_line(bytes) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(why) => {
                if g.unreadable.len() < 5 {
                    tracing::warn!(
                        "{}: line {number} is not a record ({why}); it is kept aside",
                        path.display()
                    );
                }
                g.unreadable.push((number, offset));
                return Ok(());
            }
        };
        let Some(e) = entry_of(&line, bytes, offset, keying) else {
            if g.unreadable.len() < 5 {
                tracing::warn!(
                    "{}: line {number} has a malformed fingerprint; it is kept aside",
                    path.display()
                );
            }
            g.unreadable.push((number, offset));
            return Ok(());
        };
        count(&mut g.meta, &e);
        chunk.push(e.encode());
        if chunk.len() >= runs::CHUNK {
            spill_chunk(path, &mut chunk, g)?;
        }
        Ok(())
    })?;
    g.meta.journal_len = end;
    if !chunk.is_empty() {
        spill_chunk(path, &mut chunk, g)?;
    }
    if g.unreadable.len() > 5 {
        tracing::warn!(
            "{}: {} lines in all are not records; they are kept aside",
            path.display(),
            g.unreadable.len()
        );
    }
    Ok(())
}

/// A record's part in what the index file's header adds up.
fn count(m: &mut Meta, e: &Entry) {
    m.records += 1;
    m.spent_usd += e.cost;
    m.unconfirmed_usd += e.unconfirmed;
    if e.flags & USAGE != 0 {
        m.ok_rows += 1;
        m.ok_tokens += u64::from(e.tokens);
    }
}

/// The index of an output written record by record (compaction's), from entries already
/// known: written as the index file once that output is in place, with no parse of it.
pub(super) struct Sink {
    near: std::path::PathBuf,
    chunk: Vec<[u8; REC]>,
    g: Gathered,
}

impl Sink {
    pub(super) fn new(near: &Path, keying: Keying) -> Sink {
        Sink {
            near: near.to_path_buf(),
            chunk: Vec::new(),
            g: Gathered {
                meta: Meta {
                    by_id: keying.by_id,
                    ..Meta::default()
                },
                runs: Vec::new(),
                entries: 0,
                superseded: Vec::new(),
                unreadable: Vec::new(),
            },
        }
    }

    /// The next line's entry (its offset in the new output).
    pub(super) fn push(&mut self, e: Entry) -> Result<(), Error> {
        count(&mut self.g.meta, &e);
        self.g.meta.lines += 1;
        self.chunk.push(e.encode());
        if self.chunk.len() >= runs::CHUNK {
            spill_chunk(&self.near, &mut self.chunk, &mut self.g)?;
        }
        Ok(())
    }

    /// Writes the index file of `output`, now in place and holding every line pushed.
    pub(super) fn finish(mut self, output: &Path) -> Result<(), Error> {
        if !self.chunk.is_empty() {
            spill_chunk(&self.near, &mut self.chunk, &mut self.g)?;
        }
        let (len, ino) = journal_id(output)?;
        if len == 0 {
            return Ok(());
        }
        self.g.meta.journal_len = len;
        self.g.meta.ino = ino;
        (self.g.meta.head, self.g.meta.tail) = journal_hashes(output, len)?;
        write(output, self.g, Some(&sibling(output, ".index"))).map(drop)
    }
}

/// Sorts a chunk in place, keeps each key's best entry, and spills it as a run.
fn spill_chunk(path: &Path, chunk: &mut Vec<[u8; REC]>, g: &mut Gathered) -> Result<(), Error> {
    chunk.sort_unstable_by(|a, b| cmp_encoded(a, b));
    let mut kept = 0;
    for i in 0..chunk.len() {
        // Sorted best-last within a key: a later entry of the same key replaces the kept one.
        if kept > 0 && chunk[kept - 1][..KEY] == chunk[i][..KEY] {
            supersede(&chunk[kept - 1], &mut g.superseded);
            chunk[kept - 1] = chunk[i];
        } else {
            chunk[kept] = chunk[i];
            kept += 1;
        }
    }
    g.entries += kept;
    let f = runs::spill(path, chunk[..kept].iter().map(|e| &e[..]))?;
    chunk.clear();
    g.runs.push(Box::new(f));
    Ok(())
}

/// An entry replaced by a later one of its key: its line goes to the stale file at the next
/// compaction when it was paid for.
fn supersede(old: &[u8], superseded: &mut Vec<u64>) {
    let e = Entry::decode(old);
    if e.flags & PAID != 0 {
        superseded.push(e.offset);
    }
}

/// The index file being written: its entries' checksum, fence and filter as they go.
struct Out {
    w: BufWriter<File>,
    at: std::path::PathBuf,
    body: SipHasher13,
    fence: FenceBuilder,
    filter: BloomFilter,
    n: usize,
}

impl Out {
    fn bytes(&mut self, b: &[u8]) -> Result<(), Error> {
        self.body.write(b);
        self.w.write_all(b).map_err(|e| io_err(&self.at, e))
    }

    fn entry(&mut self, e: &[u8; REC]) -> Result<(), Error> {
        self.bytes(e)?;
        self.fence.push(e);
        self.filter
            .insert_hash(filter_hash(e[..16].try_into().expect("16 bytes")));
        self.n += 1;
        Ok(())
    }
}

/// Merges the gathered runs into `out`, each key once (its best entry; the others are
/// superseded).
fn merge_into(out: &mut Out, path: &Path, g: &mut Gathered) -> Result<(), Error> {
    let mut pending: Option<[u8; REC]> = None;
    let runs = std::mem::take(&mut g.runs);
    let superseded = &mut g.superseded;
    runs::merge(runs, REC, path, cmp_encoded, |r| {
        let r: [u8; REC] = r.try_into().expect("a record");
        match &mut pending {
            // Sorted best-last within a key: the earlier one is superseded.
            Some(p) if p[..KEY] == r[..KEY] => supersede(p, superseded),
            Some(p) => out.entry(p)?,
            None => {}
        }
        pending = Some(r);
        Ok(())
    })?;
    match pending {
        Some(p) => out.entry(&p),
        None => Ok(()),
    }
}

/// Merges the runs into the index file (or a scratch file), each key once, and opens it.
fn write(path: &Path, mut g: Gathered, dest: Option<&Path>) -> Result<Index, Error> {
    let tmp = dest.map(|d| sibling(d, ".tmp"));
    let (file, at) = match &tmp {
        Some(t) => (
            // Read too: it is mapped once written.
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(t)
                .map_err(|e| io_err(t, e))?,
            t.clone(),
        ),
        None => (runs::scratch(path)?, path.to_path_buf()),
    };
    let mut out = Out {
        w: BufWriter::with_capacity(256 * 1024, file),
        at,
        body: SipHasher13::new(),
        fence: FenceBuilder::new(REC),
        filter: new_filter(g.entries),
        n: 0,
    };
    out.w
        .write_all(&[0u8; HEADER])
        .map_err(|e| io_err(&out.at, e))?;
    merge_into(&mut out, path, &mut g)?;
    for o in &g.superseded {
        out.bytes(&o.to_le_bytes())?;
    }
    for (l, o) in &g.unreadable {
        out.bytes(&l.to_le_bytes())?;
        out.bytes(&o.to_le_bytes())?;
    }
    let counts = [
        out.n as u64,
        g.superseded.len() as u64,
        g.unreadable.len() as u64,
    ];
    let mut header = header_of(&g.meta, counts);
    let sum = checksum(&header, out.body.finish());
    header[120..].copy_from_slice(&sum.to_le_bytes());
    let at = out.at;
    let mut file = out
        .w
        .into_inner()
        .map_err(|e| io_err(&at, e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| io_err(&at, e))?;
    file.write_all(&header).map_err(|e| io_err(&at, e))?;
    if let (Some(t), Some(d)) = (&tmp, dest) {
        // A cache: no fsync. A crash leaves an old, torn or absent file, which the checksum
        // and the journal's hashes refuse, and the next run rebuilds.
        std::fs::rename(t, d).map_err(|e| io_err(d, e))?;
    }
    let unreadable = std::mem::take(&mut g.unreadable);
    let mut ix = into_index(
        Cached {
            meta: g.meta,
            file,
            n: out.n,
            fence: out.fence,
            filter: out.filter,
            superseded: g.superseded,
            unreadable: Vec::new(),
        },
        dest.unwrap_or(path),
    )?;
    // Warned about while parsing, not again.
    ix.unreadable = unreadable;
    Ok(ix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(row: u64, fp: u8, status: &str, cost: f64) -> String {
        let err = if status == "ok" {
            "null".to_string()
        } else {
            r#"{"kind":"server","status":500,"message":"boom"}"#.to_string()
        };
        format!(
            r#"{{"row":{row},"id":"{row}","status":"{status}","input":{{"t":"{row}"}},"completion":"c","usage":{{"completion_tokens":3}},"cost_usd":{cost},"fingerprint":"{}","error":{err}}}"#,
            crate::fingerprint::hex(&[fp; 16])
        ) + "\n"
    }

    fn all(ix: &Index) -> Vec<Entry> {
        (0..ix.len()).map(|i| ix.entry(i).unwrap()).collect()
    }

    /// An index file brought up to date from the records appended after it says the same as
    /// one built from the whole journal: entries, superseded records, lines that are not
    /// records, and what was spent.
    #[test]
    fn an_extended_index_file_equals_one_built_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let by = Keying { by_id: false };
        let mut text = String::new();
        for i in 0..300u64 {
            text += &rec(
                i + 1,
                (i % 200) as u8,
                if i % 7 == 0 { "error" } else { "ok" },
                0.5,
            );
        }
        text += "garbage\n";
        std::fs::write(&out, &text).unwrap();
        let first = Index::open(&out, by, true).unwrap();
        assert!(dir.path().join("o.jsonl.index").exists());
        assert_eq!(first.records, 300);
        drop(first);
        let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        for i in 0..50u64 {
            f.write_all(rec(400 + i, (i * 3) as u8, "ok", 0.25).as_bytes())
                .unwrap();
        }
        f.write_all(b"more garbage\n").unwrap();
        drop(f);
        let extended = Index::open(&out, by, true).unwrap();
        let afresh = Index::load(&out, by).unwrap();
        assert_eq!(all(&extended), all(&afresh));
        let sorted = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        assert_eq!(
            sorted(&extended.superseded_paid),
            sorted(&afresh.superseded_paid)
        );
        assert_eq!(extended.unreadable, afresh.unreadable);
        assert_eq!(extended.unreadable.len(), 2);
        assert_eq!((extended.records, afresh.records), (350, 350));
        assert!((extended.spent_usd - afresh.spent_usd).abs() < 1e-9);
        assert_eq!(
            extended.mean_completion_tokens,
            afresh.mean_completion_tokens
        );
        // Read back as it is: the same again.
        let cached = Index::open(&out, by, false).unwrap();
        assert_eq!(all(&cached), all(&afresh));
        assert!(cached.get(&[3; 16], 0).unwrap().is_some());
        assert!(cached.get(&[250; 16], 0).unwrap().is_none());
    }
}
