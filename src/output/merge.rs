//! `merge`: shard outputs (each in input order) joined into one output in input order, with
//! its summary, stamp and CSV.

use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::ledger::journal::io_err;
use crate::ledger::stamp::Stamp;

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
        let stamp = Stamp::read(&crate::ledger::files::sibling(p, ".job.json"))?;
        let Some(stamp) = stamp else {
            return Err(Error::Other(format!(
                "{}: no {} beside it, so which job wrote it is unknown; run the job on it \
                 once (nothing is sent again) to write it",
                p.display(),
                crate::ledger::files::sibling(p, ".job.json").display()
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
            match crate::ledger::journal::parse_line(&line) {
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
    let tmp = crate::ledger::files::sibling(output, ".merging");
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
        if let Ok(rec) = serde_json::from_slice::<crate::ledger::record::Record>(&line) {
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
        crate::output::csv::export_csv(
            output,
            csv,
            None,
            &crate::output::csv::CsvOptions::default(),
        )?;
    }
    let mut summary = stats.summary(None);
    summary.rows_pending = missing;
    summary.write(&crate::ledger::files::sibling(output, ".summary.json"))?;
    if let Some((_, mut stamp)) = first {
        stamp.shard = None;
        stamp.input_rows = input_rows;
        stamp.rows = input_rows;
        stamp.write(&crate::ledger::files::sibling(output, ".job.json"))?;
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
    fn a_shard_output_merges_into_the_unsharded_name() {
        assert_eq!(
            unsharded(Path::new("out/x.shard-2-of-8.jsonl")),
            Some(PathBuf::from("out/x.jsonl"))
        );
    }
}
