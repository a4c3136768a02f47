//! `merge`: shard outputs (each in input order) joined into one output in input order, with
//! its summary, stamp and CSV, in one pass over the shards.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::ledger::files::{Files, Pending};
use crate::ledger::journal::{io_err, parse_line, Lock};
use crate::ledger::stamp::Stamp;
use crate::output::csv::{CsvOptions, CsvWriter};
use crate::report::Stats;

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
    // Named twice (a path and a glob that matches it): merged once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
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

/// What `merge` did.
pub struct Merged {
    pub rows: u64,
    pub overlapping: u64,
    /// Row numbers no shard has, when the input's size is known (the first few).
    pub missing: u64,
    pub missing_first: Vec<u64>,
    pub summary: crate::report::Summary,
    /// Where the output that was there before went (its `.prev` file), if there was one.
    pub kept: Option<PathBuf>,
    /// The CSV written, and its records.
    pub csv: Option<(PathBuf, u64)>,
}

/// Joins shard outputs (each in input order) into one output in input order: a k-way merge
/// on the row number, in one pass that writes the JSONL, the CSV and the summary, with flat
/// memory (one line per shard, and a few blocks of merged lines on their way to the thread
/// that reads them for the CSV and the summary). One record per row: where shards overlap the first output named wins.
/// Refuses outputs of different jobs, a shard a run is writing, and a shard not in row order;
/// a refusal or an error leaves the target as it was. An output already at the target is
/// moved to its `.prev` file (appended to it), never replaced with no copy kept.
///
/// The CSV: to `csv`, else to the job's `[output] csv` (from the shards' stamps), if it had
/// one; with the job's escaping and columns either way.
pub fn merge(inputs: &[PathBuf], output: &Path, csv: Option<&Path>) -> Result<Merged, Error> {
    if inputs.is_empty() {
        return Err(Error::Other("merge: no outputs given".into()));
    }
    if inputs.iter().any(|p| p == output) {
        return Err(Error::Other(format!(
            "merge: the output {} is one of the inputs",
            output.display()
        )));
    }
    // First: a shard a run is writing may have no stamp yet.
    let _locks = lock_all(inputs, output)?;
    let job = one_job(inputs)?;
    let csv = csv
        .map(Path::to_path_buf)
        .or_else(|| job.stamp.csv_beside(&inputs[0]));
    if let Some(d) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
    }
    let opts = CsvOptions {
        escape_formulas: job.escape,
        data_columns: job.stamp.csv_data_columns.clone(),
    };
    let columns = job.stamp.csv_input_columns.as_deref();
    let writer = csv.as_deref().map(|c| CsvWriter::create(c, columns, &opts));
    let jsonl = Pending::create(output)?;
    let p = pass(Shards::open(inputs)?, jsonl, writer.transpose()?, job.input_rows)?;
    // In place: the CSV, the output that was at the target moved to its `.prev` file
    // (appended), then the merged JSONL over the target.
    let csv_rows = p.csv.map(|(w, n)| w.commit().map(|()| n)).transpose()?;
    let prev = Files::new(output).prev();
    let kept = crate::ledger::move_appending(output, &prev)?.then_some(prev);
    p.jsonl.commit()?;
    let (counts, stats) = (p.counts, p.stats);
    let files = Files::new(output);
    let mut summary = stats.summary(None);
    summary.rows_pending = counts.missing;
    summary.write(&files.summary())?;
    let mut stamp = job.stamp;
    stamp.shard = None;
    stamp.input_rows = job.input_rows;
    stamp.rows = job.input_rows;
    stamp.csv_escape_formulas = job.escape;
    stamp.csv = csv.as_deref().map(|c| {
        crate::ledger::files::relative_to(c, output.parent().unwrap_or(Path::new("")))
    });
    stamp.write(&files.stamp())?;
    Ok(Merged {
        rows: counts.rows,
        overlapping: counts.overlapping,
        missing: counts.missing,
        missing_first: counts.missing_first,
        summary,
        kept,
        csv: csv.zip(csv_rows),
    })
}

/// What the shards' stamps say of their job.
struct JobOf {
    /// The first shard's.
    stamp: Stamp,
    input_rows: Option<u64>,
    /// Any shard's job escapes formulas: the merged CSV does.
    escape: bool,
}

/// The shards' job: the same for every shard, or a refusal that says what differs.
fn one_job(inputs: &[PathBuf]) -> Result<JobOf, Error> {
    let mut first: Option<(&PathBuf, JobOf)> = None;
    for p in inputs {
        let path = Files::new(p).stamp();
        let Some(stamp) = Stamp::read(&path)? else {
            return Err(Error::Other(format!(
                "{}: no {} beside it, so which job wrote it is unknown; run the job on it \
                 once (nothing is sent again) to write it",
                p.display(),
                path.display()
            )));
        };
        let Some((fp, job)) = &mut first else {
            let (input_rows, escape) = (stamp.input_rows, stamp.csv_escape_formulas);
            let job = JobOf {
                stamp,
                input_rows,
                escape,
            };
            first = Some((p, job));
            continue;
        };
        let diff = differences(&job.stamp, &stamp);
        if !diff.is_empty() {
            return Err(Error::Other(format!(
                "merge: {} and {} come from different jobs: {}",
                fp.display(),
                p.display(),
                diff.join("; ")
            )));
        }
        job.input_rows = job.input_rows.max(stamp.input_rows);
        job.escape |= stamp.csv_escape_formulas;
    }
    Ok(first.expect("inputs are not empty").1)
}

/// What makes two stamps different jobs: the model, the messages, the request's parameters,
/// the number of shards.
fn differences(f: &Stamp, s: &Stamp) -> Vec<String> {
    let mut diff = Vec::new();
    if f.model != s.model {
        diff.push(format!("model `{}` vs `{}`", f.model, s.model));
    }
    if f.messages != s.messages {
        diff.push("the messages (templates or their text) differ".into());
    }
    if f.params != s.params {
        diff.push("the request parameters differ".into());
    }
    if let (Some(a), Some(b)) = (f.shard, s.shard) {
        if a.n != b.n {
            diff.push(format!("split {} ways vs {} ways", a.n, b.n));
        }
    }
    diff
}

/// The target's lock and every shard's, held until the merge is done: no run writes the
/// target meanwhile, and a shard a live run is writing (its lock is held) is refused, since
/// its records are not all there yet. The same lock a run takes (`Lock::acquire`).
fn lock_all(inputs: &[PathBuf], output: &Path) -> Result<Vec<Lock>, Error> {
    let busy = |what: &str, p: &Path, e: Error| match e {
        Error::Locked { path, since } => Error::Other(format!(
            "merge: {what} {} is being written: a run holds its lock {} ({since}); merge \
             when that run has finished (nothing was written)",
            p.display(),
            path.display()
        )),
        e => e,
    };
    let mut locks = Vec::with_capacity(inputs.len() + 1);
    let target = Files::new(output).lock();
    locks.push(Lock::acquire(&target).map_err(|e| busy("the target", output, e))?);
    for p in inputs {
        let lock = Files::new(p).lock();
        locks.push(Lock::acquire(&lock).map_err(|e| busy("the shard", p, e))?);
    }
    Ok(locks)
}

/// The shard outputs being read: each one's next record line (one line per shard in memory),
/// and which comes next.
struct Shards {
    heads: Vec<Head>,
    /// (Reverse(row, shard)): the smallest row first, the first-named shard on ties.
    heap: BinaryHeap<Reverse<(u64, usize)>>,
}

struct Head {
    path: PathBuf,
    reader: BufReader<File>,
    line: Vec<u8>,
    /// Of `line`, in its file.
    number: u64,
    /// The row of the line before (a row below it is refused).
    row: Option<u64>,
}

impl Head {
    fn bad(&self, why: &str) -> Error {
        Error::Input {
            path: self.path.clone(),
            message: format!("line {}: {why}", self.number),
        }
    }
}

impl Shards {
    fn open(inputs: &[PathBuf]) -> Result<Shards, Error> {
        let mut s = Shards {
            heads: Vec::with_capacity(inputs.len()),
            heap: BinaryHeap::with_capacity(inputs.len()),
        };
        for p in inputs {
            let f = File::open(p).map_err(|e| io_err(p, e))?;
            s.heads.push(Head {
                path: p.clone(),
                reader: BufReader::with_capacity(256 * 1024, f),
                line: Vec::new(),
                number: 0,
                row: None,
            });
        }
        for i in 0..s.heads.len() {
            s.advance(i)?;
        }
        Ok(s)
    }

    /// Reads shard `i`'s next record line and queues it (blank lines are skipped). A row
    /// number below the one before it is refused: the merge takes each file as sorted.
    fn advance(&mut self, i: usize) -> Result<(), Error> {
        let h = &mut self.heads[i];
        let row = loop {
            h.line.clear();
            let n = h.reader.read_until(b'\n', &mut h.line);
            if n.map_err(|e| io_err(&h.path, e))? == 0 {
                return Ok(());
            }
            h.number += 1;
            if let Some(row) = row_of(&h.line) {
                break row;
            }
            match parse_line(&h.line) {
                Ok(Some(l)) => break l.row,
                Ok(None) => continue,
                Err(e) => return Err(h.bad(&format!("not an output record: {e}"))),
            }
        };
        if let Some(prev) = h.row.filter(|&p| row < p) {
            return Err(h.bad(&format!(
                "row {row} comes after row {prev}: this output is not in row order, so it \
                 cannot be merged (nothing was written). A run puts its output in row order \
                 when it ends: run the shard's job on it once more (nothing is sent again), or \
                 sort its lines by `row`"
            )));
        }
        h.row = Some(row);
        self.heap.push(Reverse((row, i)));
        Ok(())
    }
}

/// The row of a line as promptmill writes it (`{"row":N,` first), without parsing the rest;
/// `None` for any other line (which the parser then reads). The line is parsed whole when it
/// is merged, and refused then if it is not a record (a line that loses to an earlier-named
/// shard's record of the same row is dropped unread).
fn row_of(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"row\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 || !matches!(rest.get(digits), Some(b',' | b'}')) {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Rows merged, and the rows of the input no shard has.
#[derive(Default)]
struct Counts {
    rows: u64,
    overlapping: u64,
    missing: u64,
    missing_first: Vec<u64>,
}

impl Counts {
    fn missing(&mut self, rows: std::ops::Range<u64>) {
        let room = 10usize.saturating_sub(self.missing_first.len());
        self.missing_first.extend(rows.clone().take(room));
        self.missing += rows.end.saturating_sub(rows.start);
    }
}

/// Merged lines on their way to the thread that reads them for the summary and the CSV: a
/// block of whole lines, and where each came from (for an error naming its file and line).
#[derive(Default)]
struct Block {
    bytes: Vec<u8>,
    /// (end in `bytes`, shard, line number in the shard's file).
    lines: Vec<(usize, usize, u64)>,
}

/// A block's size when it is sent: a few of them in flight keep memory flat.
const BLOCK: usize = 256 * 1024;

enum Msg {
    Lines(Block),
    /// Every line was sent: the CSV can be finished.
    Done,
}

/// What the one pass made, none of it in place yet.
struct Passed {
    counts: Counts,
    stats: Stats,
    jsonl: Pending,
    csv: Option<(Pending, u64)>,
}

/// The one pass, in two threads side by side: this one merges the shards' lines into the
/// JSONL, the other reads each merged line once for the summary and the CSV. A refusal or an
/// error on either side leaves nothing in place.
fn pass(
    mut shards: Shards,
    mut jsonl: Pending,
    csv: Option<CsvWriter>,
    input_rows: Option<u64>,
) -> Result<Passed, Error> {
    let paths: Vec<PathBuf> = shards.heads.iter().map(|h| h.path.clone()).collect();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(2);
        let reader = scope.spawn(|| read_merged(rx, csv, &paths));
        let merged = merge_into(&mut shards, &mut jsonl, &tx, input_rows);
        if merged.is_ok() {
            let _ = tx.send(Msg::Done);
        }
        drop(tx);
        // On disk while the reader finishes the CSV.
        let merged = merged.and_then(|c| jsonl.sync().map(|()| c));
        let read = reader.join().expect("the merge's reader thread never panics");
        // The reader's error first: the merge only stops for it (its lines go nowhere).
        let (stats, csv) = read?;
        Ok(Passed {
            counts: merged?,
            stats,
            jsonl,
            csv,
        })
    })
}

/// The merge itself: the shards' lines in row order, each once, to the JSONL and the reader.
fn merge_into(
    shards: &mut Shards,
    jsonl: &mut Pending,
    tx: &std::sync::mpsc::SyncSender<Msg>,
    input_rows: Option<u64>,
) -> Result<Counts, Error> {
    let mut c = Counts::default();
    let mut last: Option<u64> = None;
    let mut block = Block::default();
    let gone = || Error::Other("merge: the reader stopped".into());
    while let Some(Reverse((row, i))) = shards.heap.pop() {
        if last == Some(row) {
            c.overlapping += 1;
        } else {
            c.missing(last.map_or(1, |l| l + 1)..row);
            last = Some(row);
            c.rows += 1;
            let h = &shards.heads[i];
            block.bytes.extend_from_slice(&h.line);
            if block.bytes.last() != Some(&b'\n') {
                block.bytes.push(b'\n');
            }
            block.lines.push((block.bytes.len(), i, h.number));
            if block.bytes.len() >= BLOCK {
                jsonl.write_all(&block.bytes)?;
                tx.send(Msg::Lines(std::mem::take(&mut block))).map_err(|_| gone())?;
            }
        }
        shards.advance(i)?;
    }
    jsonl.write_all(&block.bytes)?;
    tx.send(Msg::Lines(block)).map_err(|_| gone())?;
    if let Some(total) = input_rows {
        c.missing(last.map_or(1, |l| l + 1)..total + 1);
    }
    Ok(c)
}

/// The reader's side: every merged line parsed once, counted for the summary and written to
/// the CSV, which is finished (not put in place) when the merge says it is done.
fn read_merged(
    rx: std::sync::mpsc::Receiver<Msg>,
    mut csv: Option<CsvWriter>,
    paths: &[PathBuf],
) -> Result<(Stats, Option<(Pending, u64)>), Error> {
    let mut stats = Stats::default();
    while let Ok(msg) = rx.recv() {
        let block = match msg {
            Msg::Lines(b) => b,
            Msg::Done => {
                let csv = csv.map(CsvWriter::prepare).transpose()?;
                return Ok((stats, csv));
            }
        };
        let mut start = 0;
        for &(end, shard, number) in &block.lines {
            let bad = |why: String| Error::Input {
                path: paths[shard].clone(),
                message: format!("line {number}: not an output record: {why}"),
            };
            let line = parse_line(&block.bytes[start..end])
                .map_err(bad)?
                .ok_or_else(|| bad("a blank line".into()))?;
            stats.add_line(&line);
            if let Some(csv) = &mut csv {
                csv.add(&line).map_err(bad)?;
            }
            start = end;
        }
    }
    // The merge stopped before the end: its error is the one to report.
    Ok((stats, None))
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
    fn a_shard_output_merges_into_the_unsharded_name() {
        assert_eq!(
            unsharded(Path::new("out/x.shard-2-of-8.jsonl")),
            Some(PathBuf::from("out/x.jsonl"))
        );
    }
}
