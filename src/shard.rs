//! Shards: one job split across processes or machines with no coordinator. Each row belongs
//! to exactly one shard, chosen by a hash of its stable key (its id, else its request's
//! content), never its position, so a rescheduled shard gets the same rows from an input
//! re-exported in another order. Each shard writes its own output; `merge` joins them.

use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::job::{Job, MessageSource};
use crate::journal::io_err;

/// Shard `k` of `n`, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub k: u32,
    pub n: u32,
}

impl Shard {
    /// `K/N`, 1 ≤ K ≤ N.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: a shard is K/N, e.g. 2/8"))?;
        let k: u32 = k
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: K is not a number"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: N is not a number"))?;
        Shard::new(k, n).ok_or_else(|| format!("`{s}`: K must be between 1 and N"))
    }

    pub fn new(k: u32, n: u32) -> Option<Shard> {
        (n >= 1 && (1..=n).contains(&k)).then_some(Shard { k, n })
    }

    /// Shard K of `--shards N`, K from `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs set it
    /// 0-based: index i is shard i+1).
    pub fn from_env(n: u32) -> Result<Shard, String> {
        let v = std::env::var("JOB_COMPLETION_INDEX").map_err(|_| {
            format!(
                "--shards {n} without --shard needs JOB_COMPLETION_INDEX (0 to {}), as a \
                 Kubernetes Indexed Job sets it",
                n.saturating_sub(1)
            )
        })?;
        let i: u32 = v
            .trim()
            .parse()
            .map_err(|_| format!("JOB_COMPLETION_INDEX=`{v}` is not a number"))?;
        Shard::new(i + 1, n).ok_or_else(|| {
            format!(
                "JOB_COMPLETION_INDEX={i} is out of range for --shards {n} (0 to {})",
                n.saturating_sub(1)
            )
        })
    }

    /// Whether a row with this key is this shard's.
    pub fn owns(&self, key: u64) -> bool {
        key % u64::from(self.n) == u64::from(self.k - 1)
    }

    /// `out/x.jsonl` → `out/x.shard-2-of-8.jsonl`.
    pub fn path(&self, p: &Path) -> PathBuf {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag = format!("shard-{}-of-{}", self.k, self.n);
        let name = match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => format!("{stem}.{tag}.{ext}"),
            _ => format!("{name}.{tag}"),
        };
        p.with_file_name(name)
    }
}

fn digest16(h: Sha256) -> String {
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    crate::request::hex(&out)
}

fn first8(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The key of a row with an id: the same id is the same row, wherever it is in the input.
pub fn id_key(id: &str) -> u64 {
    first8(&Sha256::digest([b"id\0", id.as_bytes()].concat()))
}

/// The key of a row without an id: its request's content (the rendered messages). Not the
/// whole fingerprint, which also names who answers: shards pointed at different endpoints
/// must still agree on whose row is whose.
pub fn content_key(messages: &[crate::chat::Message]) -> u64 {
    let json = serde_json::to_vec(messages).expect("messages serialize");
    first8(&Sha256::digest([b"messages\0".as_slice(), &json].concat()))
}

/// The key of a row that cannot be read or rendered: its row number (all it has).
pub fn row_key(row: u64) -> u64 {
    first8(&Sha256::digest(
        [b"row\0".as_slice(), &row.to_le_bytes()].concat(),
    ))
}

/// What wrote an output, beside it (`OUTPUT.job.json`): `merge` joins only outputs of the
/// same job, and knows how many rows the input had.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stamp {
    pub job: String,
    pub model: String,
    /// Of the request's constant part: model, parameters, `extra`, who answers.
    pub params: String,
    /// Of the messages: roles, names, inline text and template files.
    pub messages: String,
    pub shard: Option<Shard>,
    /// Rows in the whole input when this shard last read all of it.
    pub input_rows: Option<u64>,
    /// Of those, this shard's.
    #[serde(default)]
    pub rows: Option<u64>,
}

impl Stamp {
    pub fn of(job: &Job, input_rows: Option<u64>, rows: Option<u64>) -> Stamp {
        let mut params = Sha256::new();
        params.update(serde_json::to_vec(&job.params).expect("serializes"));
        params.update(serde_json::to_vec(&job.params.extra).expect("serializes"));
        params.update(job.model.as_bytes());
        let mut messages = Sha256::new();
        for m in &job.messages {
            messages.update(format!("{:?}\0{:?}\0", m.role, m.name));
            match &m.source {
                MessageSource::Inline(c) => messages.update(c.as_bytes()),
                MessageSource::Field(f) => messages.update(format!("from:{f}").as_bytes()),
                MessageSource::Template(name) => {
                    let text = job
                        .template_dirs
                        .iter()
                        .find_map(|d| std::fs::read(d.join(name)).ok())
                        .unwrap_or_else(|| name.as_bytes().to_vec());
                    messages.update(&text);
                }
            }
            // Images only when a message has some: stamps of text-only jobs stay as they were.
            if !m.images.is_empty() {
                messages.update(format!("images:{:?}:{:?}", m.images, m.image_detail));
            }
            messages.update(b"\0");
        }
        Stamp {
            job: job
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            model: job.model.clone(),
            params: digest16(params),
            messages: digest16(messages),
            shard: job.shard,
            input_rows,
            rows,
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(self).expect("serializes");
        let tmp = crate::job::sibling(path, ".tmp");
        std::fs::write(&tmp, text).map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    }

    pub fn read(path: &Path) -> Result<Option<Stamp>, Error> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::Input {
                    path: path.to_path_buf(),
                    message: format!("not a promptmill job stamp: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path, e)),
        }
    }
}

/// The outputs named on the command line: paths, or glob patterns (quoted, so the shell
/// leaves them) expanded here. Companion files (`.stale`, `.prev`, …) are left out.
pub fn expand(args: &[String]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for a in args {
        if a.contains(['*', '?', '[']) {
            let paths = glob::glob(a).map_err(|e| Error::Other(format!("`{a}`: {e}")))?;
            let mut found: Vec<PathBuf> = paths
                .filter_map(Result::ok)
                .filter(|p| is_output(p))
                .collect();
            if found.is_empty() {
                return Err(Error::Other(format!("`{a}` matches no output")));
            }
            found.sort();
            out.extend(found);
        } else {
            out.push(PathBuf::from(a));
        }
    }
    out.dedup();
    Ok(out)
}

fn is_output(p: &Path) -> bool {
    let name = p.to_string_lossy();
    name.ends_with(".jsonl")
        && ![
            ".stale.jsonl",
            ".prev.jsonl",
            ".rejected.jsonl",
            ".batches.jsonl",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// A shard's next line in the merge: (smallest row first, then the first-named shard), bytes.
type Head = (std::cmp::Reverse<(u64, usize)>, Vec<u8>);

/// What `merge` did.
pub struct Merged {
    pub rows: u64,
    pub overlapping: u64,
    /// Row numbers no shard has, when the input's size is known (the first few).
    pub missing: u64,
    pub missing_first: Vec<u64>,
    pub summary: crate::report::Summary,
}

/// Joins shard outputs (each in input order) into one output in input order: a k-way merge
/// on the row number, one line per shard in memory. One record per row: where shards overlap
/// the first output named wins. Refuses outputs of different jobs.
pub fn merge(inputs: &[PathBuf], output: &Path, csv: Option<&Path>) -> Result<Merged, Error> {
    if inputs.is_empty() {
        return Err(Error::Other("merge: no outputs given".into()));
    }
    // The same job, or refuse: say what differs.
    let mut first: Option<(PathBuf, Stamp)> = None;
    let mut input_rows = None;
    for p in inputs {
        let stamp = Stamp::read(&crate::job::sibling(p, ".job.json"))?;
        let Some(stamp) = stamp else {
            return Err(Error::Other(format!(
                "{}: no {} beside it, so which job wrote it is unknown; run the job on it \
                 once (nothing is sent again) to write it",
                p.display(),
                crate::job::sibling(p, ".job.json").display()
            )));
        };
        input_rows = input_rows.max(stamp.input_rows);
        match &first {
            None => first = Some((p.clone(), stamp)),
            Some((fp, f)) => {
                let mut diff = Vec::new();
                if f.model != stamp.model {
                    diff.push(format!("model `{}` vs `{}`", f.model, stamp.model));
                }
                if f.messages != stamp.messages {
                    diff.push("the messages (templates or their text) differ".into());
                }
                if f.params != stamp.params {
                    diff.push("the request parameters differ".into());
                }
                if let (Some(a), Some(b)) = (f.shard, stamp.shard) {
                    if a.n != b.n {
                        diff.push(format!("split {} ways vs {} ways", a.n, b.n));
                    }
                }
                if !diff.is_empty() {
                    return Err(Error::Other(format!(
                        "merge: {} and {} come from different jobs: {}",
                        fp.display(),
                        p.display(),
                        diff.join("; ")
                    )));
                }
            }
        }
    }
    if inputs.iter().any(|p| p == output) {
        return Err(Error::Other(format!(
            "merge: the output {} is one of the inputs",
            output.display()
        )));
    }
    let mut readers = Vec::with_capacity(inputs.len());
    for p in inputs {
        let f = std::fs::File::open(p).map_err(|e| io_err(p, e))?;
        readers.push((p.clone(), BufReader::with_capacity(256 * 1024, f), 0u64));
    }
    // (Reverse(row), shard index): the smallest row first, the first-named shard on ties.
    let mut heap: BinaryHeap<Head> = BinaryHeap::new();
    let next = |i: usize,
                readers: &mut Vec<(PathBuf, BufReader<std::fs::File>, u64)>|
     -> Result<Option<(u64, Vec<u8>)>, Error> {
        let (path, r, n) = &mut readers[i];
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)
                .map_err(|e| io_err(path, e))?
                == 0
            {
                return Ok(None);
            }
            *n += 1;
            match crate::journal::parse_line(&line) {
                Ok(Some(l)) => return Ok(Some((l.row, line))),
                Ok(None) => continue,
                Err(e) => {
                    return Err(Error::Input {
                        path: path.clone(),
                        message: format!("line {n}: {e}"),
                    })
                }
            }
        }
    };
    for i in 0..readers.len() {
        if let Some((row, line)) = next(i, &mut readers)? {
            heap.push((std::cmp::Reverse((row, i)), line));
        }
    }
    if let Some(d) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
    }
    let tmp = crate::job::sibling(output, ".merging");
    let mut w = BufWriter::with_capacity(
        256 * 1024,
        std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?,
    );
    let mut stats = crate::report::Stats::default();
    let (mut rows, mut overlapping, mut missing) = (0u64, 0u64, 0u64);
    let mut missing_first = Vec::new();
    let mut last: u64 = 0;
    while let Some((std::cmp::Reverse((row, i)), mut line)) = heap.pop() {
        if let Some((r, l)) = next(i, &mut readers)? {
            heap.push((std::cmp::Reverse((r, i)), l));
        }
        if row == last && rows > 0 {
            overlapping += 1;
            continue;
        }
        for gap in last + 1..row {
            missing += 1;
            if missing_first.len() < 10 {
                missing_first.push(gap);
            }
        }
        last = row;
        rows += 1;
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        w.write_all(&line).map_err(|e| io_err(&tmp, e))?;
        if let Ok(rec) = serde_json::from_slice::<crate::output::Record>(&line) {
            stats.add(&rec, rec.attempts.saturating_sub(1), 0, true);
        }
    }
    if let Some(total) = input_rows {
        for gap in last + 1..=total {
            missing += 1;
            if missing_first.len() < 10 {
                missing_first.push(gap);
            }
        }
    }
    w.into_inner()
        .map_err(|e| io_err(&tmp, e.into_error()))?
        .sync_all()
        .map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, output).map_err(|e| io_err(output, e))?;
    if let Some(csv) = csv {
        crate::export::export_csv(output, csv, None, &crate::export::CsvOptions::default())?;
    }
    let mut summary = stats.summary(None);
    summary.rows_pending = missing;
    summary.write(&crate::job::sibling(output, ".summary.json"))?;
    if let Some((_, mut stamp)) = first {
        stamp.shard = None;
        stamp.input_rows = input_rows;
        stamp.rows = input_rows;
        stamp.write(&crate::job::sibling(output, ".job.json"))?;
    }
    Ok(Merged {
        rows,
        overlapping,
        missing,
        missing_first,
        summary,
    })
}

/// `out/x.shard-2-of-8.jsonl` → `out/x.jsonl`: where `merge` writes by default.
pub fn unsharded(p: &Path) -> Option<PathBuf> {
    let name = p.file_name()?.to_string_lossy().into_owned();
    let i = name.find(".shard-")?;
    let rest = &name[i + 7..];
    let j = rest.find('.').unwrap_or(rest.len());
    let tag = &rest[..j];
    let (k, n) = tag.split_once("-of-")?;
    k.parse::<u32>().ok()?;
    n.parse::<u32>().ok()?;
    Some(p.with_file_name(format!("{}{}", &name[..i], &rest[j..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_paths_and_parsing() {
        let s = Shard::parse("2/8").unwrap();
        assert_eq!(
            s.path(Path::new("out/x.jsonl")),
            PathBuf::from("out/x.shard-2-of-8.jsonl")
        );
        assert_eq!(
            unsharded(Path::new("out/x.shard-2-of-8.jsonl")),
            Some(PathBuf::from("out/x.jsonl"))
        );
        assert!(Shard::parse("0/8").is_err());
        assert!(Shard::parse("9/8").is_err());
        assert!(Shard::parse("1").is_err());
    }

    #[test]
    fn every_key_belongs_to_exactly_one_shard() {
        for key in (0..1000u64).map(|i| id_key(&i.to_string())) {
            let owners = (1..=7)
                .filter(|&k| Shard::new(k, 7).unwrap().owns(key))
                .count();
            assert_eq!(owners, 1);
        }
    }
}

/// Whether this run's shard (if any) owns a rendered row.
pub fn owns(job: &Job, p: &crate::request::Prepared) -> bool {
    job.shard.is_none_or(|sh| {
        sh.owns(if job.id_column.is_some() {
            id_key(&p.row.id)
        } else {
            content_key(&p.request.messages)
        })
    })
}

/// Whether this run's shard (if any) owns a row that could not be read or rendered.
pub fn owns_unreadable(job: &Job, row: u64) -> bool {
    job.shard.is_none_or(|sh| sh.owns(row_key(row)))
}

/// One line of `status`.
#[derive(Debug, Default, Clone)]
pub struct StatusRow {
    pub name: String,
    pub ok: u64,
    pub failed: u64,
    /// `None` when unknown (an output whose input was never read whole).
    pub pending: Option<u64>,
    pub spent_usd: f64,
}

/// Counts a job's rows per shard against each shard's output, without sending anything: the
/// same planner `run` uses, so "pending" is what the next run sends (or copies).
pub fn status_of_job(
    file: &Path,
    ov: &crate::job::Overrides,
    shards: &[Option<Shard>],
) -> Result<Vec<StatusRow>, Error> {
    use crate::plan::{Decision, Planner};
    let mut parts = Vec::new();
    for sh in shards {
        let job = Job::load(
            file,
            &crate::job::Overrides {
                shard: *sh,
                ..ov.clone()
            },
        )?;
        let keying = crate::schedule::keying(&job);
        let index = crate::ledger::Index::load(&job.output, keying)?
            .with_stale(&job.stale_path(), keying)?;
        let carried = crate::ledger::Carried::read(&job.spend_path())?;
        let spent = index.spent_usd
            + index.unconfirmed_usd
            + index.stale_spent_usd()
            + carried.unconfirmed_usd;
        let name = match sh {
            Some(s) => format!("shard {}/{} ({})", s.k, s.n, job.output.display()),
            None => job.output.display().to_string(),
        };
        parts.push((
            job,
            Planner::new(index, keying, false, None),
            StatusRow {
                name,
                spent_usd: spent,
                pending: Some(0),
                ..StatusRow::default()
            },
        ));
    }
    let Some(job0) = parts.first().map(|p| p.0.clone()) else {
        return Ok(Vec::new());
    };
    let job0 = &job0;
    let renderer = crate::render::Renderer::new(job0)?;
    let backend = crate::provider::build(job0, false)?;
    let builder = crate::request::Builder::new(job0, &backend.identity);
    for item in builder.rendered(job0, &renderer, None)? {
        for (job, planner, row) in parts.iter_mut() {
            match &item {
                crate::request::Rendered::Ready(p) if owns(job, p) => match planner.plan(p)? {
                    Decision::Done => row.ok += 1,
                    Decision::DoneFailed => row.failed += 1,
                    _ => *row.pending.as_mut().expect("set") += 1,
                },
                crate::request::Rendered::Unreadable(n) if owns_unreadable(job, *n) => {
                    row.failed += 1
                }
                _ => {}
            }
        }
    }
    Ok(parts.into_iter().map(|(_, _, r)| r).collect())
}

/// Counts the records of outputs (shards or not), without the job: done and failed from the
/// records, pending from the rows the shard had when it last read its whole input.
pub fn status_of_outputs(paths: &[PathBuf]) -> Result<Vec<StatusRow>, Error> {
    let mut out = Vec::new();
    for p in paths {
        let mut row = StatusRow {
            name: p.display().to_string(),
            ..StatusRow::default()
        };
        crate::journal::for_each_line(p, |_, _, line| {
            if let Ok(Some(l)) = crate::journal::parse_line(line) {
                match l.status {
                    crate::output::Status::Ok => row.ok += 1,
                    crate::output::Status::Error => row.failed += 1,
                }
                row.spent_usd += l.cost_usd.unwrap_or(0.0) + l.unconfirmed_usd.unwrap_or(0.0);
            }
            Ok(())
        })?;
        let stamp = Stamp::read(&crate::job::sibling(p, ".job.json"))?;
        row.pending = stamp
            .and_then(|s| s.rows)
            .map(|n| n.saturating_sub(row.ok + row.failed));
        out.push(row);
    }
    Ok(out)
}

/// The `status` table: one line per shard (or output) and the total.
pub fn status_table(rows: &[StatusRow]) -> String {
    let mut total = StatusRow {
        name: "total".into(),
        pending: Some(0),
        ..StatusRow::default()
    };
    for r in rows {
        total.ok += r.ok;
        total.failed += r.failed;
        total.spent_usd += r.spent_usd;
        total.pending = match (total.pending, r.pending) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }
    let pending = |p: Option<u64>| p.map_or_else(|| "?".to_string(), |p| p.to_string());
    let mut lines = vec![format!(
        "{:>8} {:>8} {:>8} {:>12}  {}",
        "done", "failed", "pending", "spent", "output"
    )];
    let all: Vec<&StatusRow> = if rows.len() > 1 {
        rows.iter().chain(std::iter::once(&total)).collect()
    } else {
        rows.iter().collect()
    };
    for r in all {
        lines.push(format!(
            "{:>8} {:>8} {:>8} {:>12}  {}",
            r.ok,
            r.failed,
            pending(r.pending),
            format!("${:.6}", r.spent_usd),
            r.name
        ));
    }
    lines.join("\n") + "\n"
}
