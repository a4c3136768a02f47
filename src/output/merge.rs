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
use crate::output::csv::{CsvOptions, CsvRecord, CsvWriter};
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
    crate::ledger::files::is_output_name(&p.to_string_lossy())
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
    /// The Parquet table written (`--parquet`), and its records.
    pub parquet: Option<(PathBuf, u64)>,
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
pub fn merge(
    inputs: &[PathBuf],
    output: &Path,
    csv: Option<&Path>,
    parquet: Option<&Path>,
) -> Result<Merged, Error> {
    if inputs.is_empty() {
        return Err(Error::Other("merge: no outputs given".into()));
    }
    if inputs.iter().any(|p| p == output) {
        return Err(Error::Other(format!(
            "merge: the output {} is one of the inputs",
            output.display()
        )));
    }
    for p in inputs {
        // Before its lock is made beside it.
        std::fs::metadata(p).map_err(|e| io_err(p, e))?;
    }
    // Then the locks: a shard a run is writing may have no stamp yet.
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
    let p = pass(
        Shards::open(inputs)?,
        jsonl,
        writer.transpose()?,
        job.input_rows,
    )?;
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
    job.merged(output, csv.as_deref()).write(&files.stamp())?;
    // From the merged output, under the locks, in one more streaming pass: the column types
    // come from the values (a merge has no job file).
    let parquet = match parquet {
        Some(pq) => {
            let opts = crate::output::parquet::ParquetOptions {
                input: crate::output::parquet::InputTypes::Infer,
                data_schema: None,
            };
            let n = crate::output::parquet::export_parquet(output, pq, &opts)?;
            Some((pq.to_path_buf(), n))
        }
        None => None,
    };
    Ok(Merged {
        parquet,
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

impl JobOf {
    /// The merged output's stamp: the job's, unsharded, naming the CSV written with it.
    fn merged(self, output: &Path, csv: Option<&Path>) -> Stamp {
        let dir = output.parent().unwrap_or(Path::new(""));
        Stamp {
            shard: None,
            input_rows: self.input_rows,
            rows: self.input_rows,
            csv: csv.map(|c| crate::ledger::files::relative_to(c, dir)),
            csv_escape_formulas: self.escape,
            ..self.stamp
        }
    }
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

/// Merged lines on their way from the merge to the thread that reads them: a block of whole
/// lines, and where each came from (for an error naming its file and line).
#[derive(Default)]
struct Block {
    bytes: Vec<u8>,
    /// (end in `bytes`, shard, line number in the shard's file).
    lines: Vec<(usize, usize, u64)>,
}

/// A block's size when it is sent: a few of them in flight keep memory flat.
const BLOCK: usize = 256 * 1024;

/// What goes from one thread of the pass to the next.
enum Msg<T> {
    Lines(T),
    /// Every line was sent: the CSV can be finished.
    Done,
}

/// Why a thread of the pass stopped before the end.
enum Stop {
    Failed(Error),
    /// The thread it hands lines to stopped: that one's error is the one to report.
    Next,
}

/// What the one pass made, none of it in place yet.
struct Passed {
    counts: Counts,
    stats: Stats,
    jsonl: Pending,
    csv: Option<(Pending, u64)>,
}

/// The one pass, in three threads side by side: this one merges the shards' lines into the
/// JSONL; the next parses each merged line once, for the summary and for where its CSV cells
/// are; the last writes the CSV from those. A refusal or an error in any of them leaves
/// nothing in place.
fn pass(
    mut shards: Shards,
    mut jsonl: Pending,
    csv: Option<CsvWriter>,
    input_rows: Option<u64>,
) -> Result<Passed, Error> {
    let paths: Vec<PathBuf> = shards.heads.iter().map(|h| h.path.clone()).collect();
    let paths = &paths;
    std::thread::scope(|scope| {
        let (to_reader, from_merge) = std::sync::mpsc::sync_channel::<Msg<Block>>(2);
        let (to_csv, from_reader) = std::sync::mpsc::sync_channel::<Msg<Parsed>>(2);
        let writer = csv.map(|w| scope.spawn(move || write_csv(from_reader, w, paths)));
        let to_csv = writer.is_some().then_some(to_csv);
        let reader = scope.spawn(move || read_merged(from_merge, to_csv, paths));
        let merged = merge_into(&mut shards, &mut jsonl, &to_reader, input_rows);
        if merged.is_ok() {
            let _ = to_reader.send(Msg::Done);
        }
        drop(to_reader);
        // On disk while the others finish.
        let merged = merged.and_then(|c| jsonl.sync().map(|()| c).map_err(Stop::Failed));
        let stats = reader.join().expect("the merge's reader never panics");
        let csv = match writer {
            Some(w) => w.join().expect("the merge's CSV writer never panics")?,
            None => None,
        };
        // The last thread's error first: the ones before it stopped for it.
        let failed = |s: Stop| match s {
            Stop::Failed(e) => e,
            Stop::Next => Error::Other("merge: stopped".into()),
        };
        let stats = stats.map_err(failed)?;
        Ok(Passed {
            counts: merged.map_err(failed)?,
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
    tx: &std::sync::mpsc::SyncSender<Msg<Block>>,
    input_rows: Option<u64>,
) -> Result<Counts, Stop> {
    let mut c = Counts::default();
    let mut last: Option<u64> = None;
    let mut block = Block::default();
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
                jsonl.write_all(&block.bytes).map_err(Stop::Failed)?;
                let full = std::mem::take(&mut block);
                tx.send(Msg::Lines(full)).map_err(|_| Stop::Next)?;
            }
        }
        shards.advance(i).map_err(Stop::Failed)?;
    }
    jsonl.write_all(&block.bytes).map_err(Stop::Failed)?;
    tx.send(Msg::Lines(block)).map_err(|_| Stop::Next)?;
    if let Some(total) = input_rows {
        c.missing(last.map_or(1, |l| l + 1)..total + 1);
    }
    Ok(c)
}

/// A block, parsed: where each line's CSV parts are.
struct Parsed {
    block: Block,
    parts: Vec<Parts>,
}

/// The reader: every merged line parsed once, counted for the summary and, when there is a
/// CSV, its parts located for the CSV writer.
fn read_merged(
    rx: std::sync::mpsc::Receiver<Msg<Block>>,
    tx: Option<std::sync::mpsc::SyncSender<Msg<Parsed>>>,
    paths: &[PathBuf],
) -> Result<Stats, Stop> {
    let mut stats = Stats::default();
    while let Ok(msg) = rx.recv() {
        let Msg::Lines(block) = msg else {
            if let Some(tx) = &tx {
                tx.send(Msg::Done).map_err(|_| Stop::Next)?;
            }
            return Ok(stats);
        };
        let mut parts = Vec::with_capacity(tx.as_ref().map_or(0, |_| block.lines.len()));
        let mut start = 0;
        for &(end, shard, number) in &block.lines {
            let bad = |why: String| Stop::Failed(not_a_record(&paths[shard], number, &why));
            let line = parse_line(&block.bytes[start..end])
                .map_err(bad)?
                .ok_or_else(|| bad("a blank line".into()))?;
            stats.add_line(&line);
            if tx.is_some() {
                parts.push(Parts::of(&CsvRecord::from(&line), &block.bytes));
            }
            start = end;
        }
        if let Some(tx) = &tx {
            let parsed = Parsed { block, parts };
            tx.send(Msg::Lines(parsed)).map_err(|_| Stop::Next)?;
        }
    }
    // The merge stopped before the end: its error is the one to report.
    Ok(stats)
}

/// The CSV writer's thread: every merged line's cells, then (when the merge is done) the CSV
/// finished, not yet in place.
fn write_csv(
    rx: std::sync::mpsc::Receiver<Msg<Parsed>>,
    mut csv: CsvWriter,
    paths: &[PathBuf],
) -> Result<Option<(Pending, u64)>, Error> {
    while let Ok(msg) = rx.recv() {
        let Msg::Lines(p) = msg else {
            return csv.prepare().map(Some);
        };
        // Each line was checked as UTF-8 when it was parsed.
        let text = std::str::from_utf8(&p.block.bytes)
            .map_err(|e| Error::Other(format!("merge: a merged block is not text: {e}")))?;
        for (parts, &(_, shard, number)) in p.parts.iter().zip(&p.block.lines) {
            csv.add(&parts.record(text))
                .map_err(|why| not_a_record(&paths[shard], number, &why))?;
        }
    }
    // The merge stopped before the end: an earlier thread's error is the one to report.
    Ok(None)
}

fn not_a_record(path: &Path, number: u64, why: &str) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        message: format!("line {number}: not an output record: {why}"),
    }
}

/// A merged line's CSV parts (a `CsvRecord`) as byte ranges of its block, so that the CSV
/// thread can borrow them from the block as the parser did from the line.
struct Parts {
    input: Option<Piece>,
    completion: Option<Piece>,
    data: Option<Piece>,
    variants: Option<Piece>,
    error: Option<Piece>,
    usage: Option<[u64; 3]>,
    cost_usd: Option<f64>,
    ok: bool,
}

/// Text in the block, or (an error message the parser had to unescape) of its own.
enum Piece {
    At(usize, usize),
    Own(String),
}

impl Piece {
    fn of(s: &str, block: &[u8]) -> Piece {
        let start = (s.as_ptr() as usize).checked_sub(block.as_ptr() as usize);
        match start {
            Some(a) if a + s.len() <= block.len() => Piece::At(a, a + s.len()),
            _ => Piece::Own(s.to_string()),
        }
    }

    fn get<'a>(&'a self, text: &'a str) -> &'a str {
        match self {
            Piece::At(a, b) => &text[*a..*b],
            Piece::Own(s) => s,
        }
    }
}

impl Parts {
    fn of(r: &CsvRecord, block: &[u8]) -> Parts {
        let piece = |s: Option<&str>| s.map(|s| Piece::of(s, block));
        Parts {
            input: piece(r.input),
            completion: piece(r.completion),
            data: piece(r.data),
            variants: piece(r.variants),
            error: piece(r.error),
            usage: r.usage,
            cost_usd: r.cost_usd,
            ok: r.ok,
        }
    }

    fn record<'a>(&'a self, text: &'a str) -> CsvRecord<'a> {
        let get = |p: &'a Option<Piece>| p.as_ref().map(|p| p.get(text));
        CsvRecord {
            input: get(&self.input),
            completion: get(&self.completion),
            data: get(&self.data),
            variants: get(&self.variants),
            usage: self.usage,
            cost_usd: self.cost_usd,
            ok: self.ok,
            error: get(&self.error),
        }
    }
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

    fn stamp(k: u32) -> Stamp {
        Stamp {
            job: "j.toml".into(),
            model: "m".into(),
            params: "p".into(),
            messages: "q".into(),
            shard: crate::shard::Shard::new(k, 2),
            input_rows: Some(6),
            rows: None,
            csv: Some("x.csv".into()),
            csv_escape_formulas: true,
            csv_input_columns: None,
            csv_data_columns: None,
        }
    }

    fn rec(row: u64, input: &str, extra: &str) -> String {
        format!(
            r#"{{"row":{row},"id":"{row}","status":"ok","input":{input},"completion":"c{row}","usage":{{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}},"cost_usd":0.5,"attempts":1,"latency_ms":7,"fingerprint":"f{row}"{extra}}}"#
        )
    }

    /// Two shard outputs in `dir` (`x.shard-K-of-2.jsonl`), with their stamps.
    fn shards(dir: &Path, one: &[String], two: &[String]) -> Vec<PathBuf> {
        [one, two]
            .iter()
            .enumerate()
            .map(|(i, lines)| {
                let p = dir.join(format!("x.shard-{}-of-2.jsonl", i + 1));
                std::fs::write(&p, lines.join("\n") + "\n").unwrap();
                stamp(i as u32 + 1).write(&Files::new(&p).stamp()).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn the_merged_csv_is_the_export_of_the_merged_output() {
        let dir = tempfile::tempdir().unwrap();
        let err = r#","status":"error","error":{"kind":"bad_request","status":400,"message":"=\"x\" \u00e9"}"#;
        let one = [
            rec(1, r#"{"a":"=1"}"#, ""),
            // Written by another tool: spaces, `row` not first, an escaped error message.
            format!(
                "  {{\"id\": \"3\", \"row\": 3, \"input\": {{\"b\": 2}}, \"attempts\": 1{}}}\r",
                err.replace(r#","status":"error""#, r#", "status": "error""#)
            ),
            rec(
                5,
                r#"{"a":"5","c":null}"#,
                r#","data":{"d":"-d","e":[1,2]}"#,
            ),
        ];
        let two = [
            rec(
                2,
                r#"{"b":"two"}"#,
                r#","variants":[{"completion":"+v1","finish_reason":"stop"},{"completion":"v2","finish_reason":"stop","data":{"d":"x"}}]"#,
            ),
            rec(4, r#"{"a":"4"}"#, ""),
            rec(6, r#"{"a":"6"}"#, ""),
        ];
        let inputs = shards(dir.path(), &one, &two);
        let out = dir.path().join("x.jsonl");
        let m = merge(&inputs, &out, None, None).unwrap();
        assert_eq!((m.rows, m.missing, m.overlapping), (6, 0, 0));
        let csv = dir.path().join("x.csv");
        assert_eq!(m.csv, Some((csv.clone(), 6)), "to the stamp's CSV");
        let again = dir.path().join("again.csv");
        let opts = CsvOptions {
            escape_formulas: true,
            data_columns: None,
        };
        assert_eq!(
            crate::output::csv::export_csv(&out, &again, None, &opts).unwrap(),
            6
        );
        let merged = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(merged, std::fs::read_to_string(&again).unwrap());
        assert!(merged.contains("'=\"\"x\"\" é"), "{merged}");
        assert!(merged.contains("'+v1"), "{merged}");
        assert_eq!(merged.lines().count(), 1 + 7, "a line per variant");
        let rows: Vec<u64> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| parse_line(l.as_bytes()).unwrap().unwrap().row)
            .collect();
        assert_eq!(rows, [1, 2, 3, 4, 5, 6]);
        assert_eq!((m.summary.rows_ok, m.summary.rows_failed), (5, 1));
    }

    #[test]
    fn a_line_that_is_not_a_record_stops_the_merge_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let one = [
            rec(1, "{}", ""),
            r#"{"row":3,"id":"3","status":"#.to_string(),
        ];
        let two = [rec(2, "{}", ""), rec(4, "{}", "")];
        let inputs = shards(dir.path(), &one, &two);
        let out = dir.path().join("x.jsonl");
        std::fs::write(&out, "old\n").unwrap();
        let Err(e) = merge(&inputs, &out, None, None) else {
            panic!("merged a line that is not a record");
        };
        let e = e.to_string();
        assert!(
            e.contains("x.shard-1-of-2.jsonl: line 2: not an output record"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "old\n");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".lock") && !n.ends_with(".job.json"))
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["x.jsonl", "x.shard-1-of-2.jsonl", "x.shard-2-of-2.jsonl"]
        );
    }

    #[test]
    fn an_input_that_is_not_there_is_an_error_and_gets_no_lock() {
        let dir = tempfile::tempdir().unwrap();
        let typo = dir.path().join("x.shard-1-of-2.jsonl");
        let Err(e) = merge(
            std::slice::from_ref(&typo),
            &dir.path().join("x.jsonl"),
            None,
            None,
        ) else {
            panic!("merged an output that is not there");
        };
        assert!(e.to_string().contains("x.shard-1-of-2.jsonl"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_row_is_read_from_a_canonical_line_only() {
        assert_eq!(row_of(br#"{"row":42,"id":"x"}"#), Some(42));
        assert_eq!(row_of(br#"{"row":7}"#), Some(7));
        for l in [
            &br#"{"id":"x","row":42}"#[..],
            br#"{"row":-1,"#,
            br#"{"row":1.5,"#,
            br#"{"row":,"#,
            br#"{"row":99999999999999999999,"#,
            b" {\"row\":1,",
        ] {
            assert_eq!(row_of(l), None, "{}", String::from_utf8_lossy(l));
        }
    }

    #[test]
    fn a_shard_output_merges_into_the_unsharded_name() {
        assert_eq!(
            unsharded(Path::new("out/x.shard-2-of-8.jsonl")),
            Some(PathBuf::from("out/x.jsonl"))
        );
    }
}
