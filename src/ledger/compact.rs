//! Compaction: the plan spool walked in input order, each row's record written where it
//! belongs, records no row asked for moved to the stale file, foreign lines set aside.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::fingerprint::fingerprint_bytes;
use crate::ledger::journal::io_err;

use super::index::{entry_of, Entry};
use super::indexfile::Sink;
use super::rewrite::rewrite;
use super::*;
use crate::ledger::journal;

/// One input row in the plan spool.
#[derive(Debug, Serialize, Deserialize)]
pub struct Planned {
    pub row: u64,
    /// Hex of the key's fingerprint part.
    pub fp: String,
    #[serde(default)]
    pub idh: u64,
    /// Present when the row's record must be rewritten (renumbered, changed fields, a copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Map<String, Value>>,
    /// The fingerprint the record must carry, when it was found under an older one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// The plan spool's writer: one line per input row, in input order. A temporary file beside
/// the output, read by compaction and removed after it.
pub struct Spool {
    path: PathBuf,
    w: BufWriter<File>,
    line: Vec<u8>,
    rows: u64,
    /// While every row so far keeps its record as it stands and those records follow one
    /// another from the output's first byte: where the next one must start.
    chain: Option<u64>,
}

/// The finished plan spool.
#[derive(Debug)]
pub struct Plan {
    pub path: PathBuf,
    rows: u64,
    /// Every row kept its record as it stands, and those records, in input order, are the
    /// output's lines from its first byte up to here: when that is the whole output,
    /// compaction would copy it byte for byte, so it is not run (a rerun that changes
    /// nothing then reads no index entry twice).
    in_place_to: Option<u64>,
}

#[cfg(test)]
impl Plan {
    /// A plan spool with no proof that the output is in place.
    pub fn at(path: &Path) -> Plan {
        Plan {
            path: path.to_path_buf(),
            rows: 0,
            in_place_to: None,
        }
    }
}

impl Spool {
    pub fn create(path: &Path) -> Result<Spool, Error> {
        let f = File::create(path).map_err(|e| io_err(path, e))?;
        Ok(Spool {
            path: path.to_path_buf(),
            w: BufWriter::with_capacity(256 * 1024, f),
            line: Vec::with_capacity(1024),
            rows: 0,
            chain: Some(0),
        })
    }

    /// One row's plan. `kept`: the row keeps its record byte for byte, and it stands at this
    /// offset with this length (with its line end).
    pub fn push(&mut self, p: &Planned, kept: Option<(u64, u32)>) -> Result<(), Error> {
        self.rows += 1;
        self.chain = match (self.chain, kept) {
            (Some(end), Some((offset, len))) if offset == end && len > 0 => {
                Some(end + u64::from(len))
            }
            _ => None,
        };
        self.line.clear();
        serde_json::to_writer(&mut self.line, p).expect("a plan line serializes");
        self.line.push(b'\n');
        self.w
            .write_all(&self.line)
            .map_err(|e| io_err(&self.path, e))
    }

    pub fn finish(self) -> Result<Plan, Error> {
        let path = self.path.clone();
        self.w
            .into_inner()
            .map_err(|e| io_err(&path, e.into_error()))?;
        Ok(Plan {
            path,
            rows: self.rows,
            in_place_to: self.chain,
        })
    }
}

/// Where compaction puts what it takes out of the output.
pub struct Sidecars {
    pub stale: PathBuf,
    pub rejected: PathBuf,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub rows: u64,
    pub copies: u64,
    pub pending: u64,
    pub stale: u64,
    pub rejected: u64,
    pub rewritten: bool,
}

/// Rewrites the output in input order from the plan spool. `complete`: the spool covers the
/// whole current input (the run read it to the end); otherwise records no row asked for stay
/// in the output, after the ordered rows, for the rows not reached yet.
pub fn compact(
    output: &Path,
    plan: &Plan,
    complete: bool,
    keying: Keying,
    side: &Sidecars,
) -> Result<Compacted, Error> {
    if let Some(end) = plan.in_place_to {
        // Every line of the output is one row's record, in input order, kept as it is: no
        // record left over, superseded or unreadable, none appended since the plan.
        let len = match std::fs::metadata(output) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(output, e)),
        };
        if len == end {
            return Ok(Compacted {
                rows: plan.rows,
                ..Compacted::default()
            });
        }
    }
    let mut c = Compactor::open(output, keying, side)?;
    c.follow(&plan.path)?;
    let stale = c.leftovers(complete)?;
    c.drain()?;
    c.finish(stale)
}

/// A line on its way to the compacted output, in order: kept as it was read, or to be
/// rewritten for its row.
enum Queued {
    Kept(Vec<u8>, Entry),
    Rewrite {
        line: Vec<u8>,
        p: Planned,
        copy: Option<Option<u64>>,
        /// Read from the stale file, not the output.
        from_stale: bool,
        offset: u64,
    },
}

/// Lines queued before the rewrites among them are done, on two threads, and written.
const QUEUE: usize = 2048;

impl Queued {
    /// The line to write and its entry; `output` and `stale` name where a line came from in
    /// an error.
    fn into_line(
        self,
        (output, stale, keying): (&Path, &Path, Keying),
    ) -> Result<(Vec<u8>, Option<Entry>), Error> {
        match self {
            Queued::Kept(line, e) => Ok((line, Some(e))),
            Queued::Rewrite {
                line,
                p,
                copy,
                from_stale,
                offset,
            } => {
                let path = if from_stale { stale } else { output };
                rewrite(&line, p, copy, path, offset, keying)
            }
        }
    }
}

/// One compaction: the index, the rewritten output being written beside the output, the
/// output read back by offset, and whether the result is the output byte for byte.
struct Compactor<'a> {
    output: &'a Path,
    side: &'a Sidecars,
    ix: Index,
    /// Per index entry, the row that took its record first, plus one; 0 while none has.
    taken: Vec<u32>,
    /// The index of the compacted output, entry by entry as its lines are written.
    sink: Sink,
    /// Bytes written to the compacted output.
    written: u64,
    keying: Keying,
    report: Compacted,
    /// The compacted output, written to `tmp` beside the output; opened only once it differs
    /// from the output (a rerun that changes nothing writes nothing).
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    /// The output, when there is one; `pos` is where it stands.
    src: Option<BufReader<File>>,
    pos: u64,
    /// The stale file, read only for a restored row's copy, and where it stands.
    stale_src: Option<(BufReader<File>, u64)>,
    /// The offset a verbatim copy of the output would read next.
    expect: u64,
    /// Nothing moved, changed or left out so far: the output needs no rewrite.
    in_place: bool,
    /// The line last read.
    buf: Vec<u8>,
    /// Lines read and not written yet (only once the output is no longer in place).
    queue: Vec<Queued>,
}

impl<'a> Compactor<'a> {
    fn open(output: &'a Path, keying: Keying, side: &'a Sidecars) -> Result<Compactor<'a>, Error> {
        let ix = Index::open(output, keying, true)?.with_stale(&side.stale, keying, true)?;
        let taken = vec![0; ix.len()];
        let tmp = crate::ledger::files::sibling(output, ".compact");
        let src = match File::open(output) {
            Ok(f) => Some(BufReader::with_capacity(256 * 1024, f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(output, e)),
        };
        Ok(Compactor {
            output,
            side,
            ix,
            taken,
            sink: Sink::new(output, keying),
            written: 0,
            keying,
            report: Compacted::default(),
            tmp,
            out: None,
            src,
            pos: 0,
            stale_src: None,
            expect: 0,
            in_place: true,
            buf: Vec::new(),
            queue: Vec::new(),
        })
    }

    /// Walks the plan spool: each line is one input row, in input order.
    fn follow(&mut self, spool: &Path) -> Result<(), Error> {
        let spool_file = File::open(spool).map_err(|e| io_err(spool, e))?;
        let mut line = String::new();
        let mut spool_rdr = BufReader::with_capacity(256 * 1024, spool_file);
        let mut spool_line = 0u64;
        loop {
            line.clear();
            if spool_rdr
                .read_line(&mut line)
                .map_err(|e| io_err(spool, e))?
                == 0
            {
                return Ok(());
            }
            spool_line += 1;
            let p: Planned = serde_json::from_str(&line).map_err(|e| Error::Input {
                path: spool.to_path_buf(),
                message: format!("line {spool_line}: {e}"),
            })?;
            let fp = fingerprint_bytes(&p.fp).ok_or_else(|| Error::Input {
                path: spool.to_path_buf(),
                message: format!("line {spool_line}: bad key"),
            })?;
            self.row(p, &fp)?;
        }
    }

    /// One row's record: its own, unless an earlier row already took it; else a copy of the
    /// same request's record, from the output or else from the stale file; else it is pending.
    fn row(&mut self, p: Planned, fp: &[u8; 16]) -> Result<(), Error> {
        let ix = &self.ix;
        let (i, copy) = match ix.position(fp, p.idh)? {
            Some(i) if self.taken[i] == 0 => (i, false),
            Some(i) => (i, true),
            None => match ix.source_index(fp, false, &self.taken)? {
                Some(i) => (i, true),
                None => return self.copy_from_stale(p, fp),
            },
        };
        let e = ix.entry(i)?;
        let first = self.taken[i];
        if !copy {
            self.taken[i] = p.row.min(u64::from(u32::MAX) - 1) as u32 + 1;
        }
        let verbatim = !copy && p.input.is_none() && e.ident != 0;
        if verbatim {
            self.keep_verbatim(e)?;
        } else {
            self.diverge()?;
            self.read(e.offset)?;
            let from = copy.then(|| (first > 1).then(|| u64::from(first) - 1));
            if copy {
                self.report.copies += 1;
            }
            let line = std::mem::take(&mut self.buf);
            self.enqueue(Queued::Rewrite {
                line,
                p,
                copy: from,
                from_stale: false,
                offset: e.offset,
            })?;
        }
        self.report.rows += 1;
        Ok(())
    }

    /// A row whose request no record in the output answers: a copy of the stale file's
    /// record if it has one (a row put back), else the row is pending.
    fn copy_from_stale(&mut self, p: Planned, fp: &[u8; 16]) -> Result<(), Error> {
        self.diverge()?;
        let from_stale = match self.ix.stale.as_deref() {
            Some(st) => match st.source_index(fp, true, &[])? {
                Some(i) => Some(st.entry(i)?.offset),
                None => None,
            },
            None => None,
        };
        let Some(offset) = from_stale else {
            self.report.pending += 1;
            return Ok(());
        };
        let stale = &self.side.stale;
        if self.stale_src.is_none() {
            let f = File::open(stale).map_err(|e| io_err(stale, e))?;
            self.stale_src = Some((BufReader::new(f), 0));
        }
        let (rdr, at) = self.stale_src.as_mut().expect("opened above");
        read_line_at(rdr, at, offset, &mut self.buf).map_err(|e| io_err(stale, e))?;
        let line = std::mem::take(&mut self.buf);
        self.enqueue(Queued::Rewrite {
            line,
            p,
            copy: Some(None),
            from_stale: true,
            offset,
        })?;
        self.report.copies += 1;
        self.report.rows += 1;
        Ok(())
    }

    /// Writes the line just read from the output (at `offset`) as it is; the output is no
    /// longer in place unless the line follows the one kept before it.
    fn keep_verbatim(&mut self, e: Entry) -> Result<(), Error> {
        if e.offset != self.expect {
            self.diverge()?;
        }
        if self.out.is_none() && e.len > 0 {
            // Still the output as it is: the line stays where it stands, unread.
            self.expect = e.offset + u64::from(e.len);
            self.sink.push(Entry {
                offset: self.written,
                ..e
            })?;
            self.written += u64::from(e.len);
            return Ok(());
        }
        self.read(e.offset)?;
        self.expect = e.offset + self.buf.len() as u64;
        let line = std::mem::take(&mut self.buf);
        // Behind rewrites still queued it waits its turn; else it goes at once (a run's
        // compaction of records that came back out of order spawns no thread).
        if !self.queue.is_empty() {
            return self.enqueue(Queued::Kept(line, e));
        }
        let put = self.put(&line, Some(e));
        self.buf = line;
        put
    }

    /// Queues a line for the compacted output (which is open by now); a full queue is
    /// written.
    fn enqueue(&mut self, q: Queued) -> Result<(), Error> {
        self.queue.push(q);
        if self.queue.len() >= QUEUE {
            self.drain()?;
        }
        Ok(())
    }

    /// Writes the queued lines in order, rewriting those that need it first: parsing and
    /// writing a record again is the dearest step of a compaction that renumbers every row,
    /// so the queue is split between this thread and one more.
    fn drain(&mut self) -> Result<(), Error> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let mut queue = std::mem::take(&mut self.queue);
        let back = queue.split_off(queue.len() / 2);
        let this = (self.output, self.side.stale.as_path(), self.keying);
        let (front, back) = std::thread::scope(|s| {
            let other = s.spawn(move || {
                back.into_iter()
                    .map(|q| q.into_line(this))
                    .collect::<Result<Vec<_>, _>>()
            });
            let front = queue
                .into_iter()
                .map(|q| q.into_line(this))
                .collect::<Result<Vec<_>, _>>();
            let back = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (front, back)
        });
        for (line, entry) in front?.into_iter().chain(back?) {
            self.put(&line, entry)?;
        }
        Ok(())
    }

    /// Reads the output's line at `offset` into `buf`.
    fn read(&mut self, offset: u64) -> Result<(), Error> {
        let Some(rdr) = self.src.as_mut() else {
            unreachable!("an index entry implies an output file")
        };
        read_line_at(rdr, &mut self.pos, offset, &mut self.buf)
            .map_err(|err| io_err(self.output, err))
    }

    /// Writes a line to the compacted output, and its entry (`None`: read from the line) to
    /// the index of it.
    fn put(&mut self, line: &[u8], e: Option<Entry>) -> Result<(), Error> {
        let e = match e {
            Some(e) => e,
            None => journal::parse_line(line)
                .ok()
                .flatten()
                .and_then(|l| entry_of(&l, line, 0, self.keying))
                .ok_or_else(|| Error::Other("a rewritten record does not read back".into()))?,
        };
        self.sink.push(Entry {
            offset: self.written,
            len: u32::try_from(line.len()).unwrap_or(0),
            ..e
        })?;
        self.written += line.len() as u64;
        match self.out.as_mut() {
            Some(out) => write_out(out, &self.tmp, line),
            None => Ok(()),
        }
    }

    /// The compacted output stops being the output: its file is opened, and what was kept in
    /// place so far (every line up to `written`, verbatim and in order) is copied into it.
    fn diverge(&mut self) -> Result<(), Error> {
        self.in_place = false;
        if self.out.is_some() {
            return Ok(());
        }
        let f = File::create(&self.tmp).map_err(|e| io_err(&self.tmp, e))?;
        let mut out = BufWriter::with_capacity(256 * 1024, f);
        if self.written > 0 {
            let src = File::open(self.output).map_err(|e| io_err(self.output, e))?;
            let copied = std::io::copy(&mut src.take(self.written), &mut out)
                .map_err(|e| io_err(&self.tmp, e))?;
            if copied != self.written {
                return Err(Error::Other(format!(
                    "{}: shorter than what compaction kept of it",
                    self.output.display()
                )));
            }
        }
        self.out = Some(out);
        Ok(())
    }

    /// What no row took: stale when the whole input was read (returned, with the superseded
    /// records that were paid for), else kept at the end for the rows to come.
    fn leftovers(&mut self, complete: bool) -> Result<Vec<u64>, Error> {
        // (offset, position in the index, an input error's)
        let mut leftover: Vec<(u64, usize, bool)> = Vec::new();
        let taken = &self.taken;
        self.ix.entries.scan(|i, rec| {
            if taken[i] == 0 {
                let e = Entry::decode(rec);
                leftover.push((e.offset, i, e.outcome() == Outcome::Input));
            }
        })?;
        leftover.sort_unstable();
        let mut stale: Vec<u64> = self.ix.superseded_paid.clone();
        for &(offset, i, input_error) in &leftover {
            if complete {
                if !input_error {
                    stale.push(offset);
                }
            } else if self.src.is_some() {
                let e = self.ix.entry(i)?;
                self.keep_verbatim(e)?;
            }
        }
        if complete && !leftover.is_empty() {
            self.diverge()?;
        }
        if !self.ix.superseded_paid.is_empty() || !self.ix.unreadable.is_empty() {
            self.diverge()?;
        }
        let file_len = std::fs::metadata(self.output).map(|m| m.len()).unwrap_or(0);
        // Superseded lines that cost nothing are dropped: they too make the file change.
        if self.expect != file_len {
            self.diverge()?;
        }
        Ok(stale)
    }

    /// Leaves the output as it is when nothing changed; else moves the `stale` lines and the
    /// lines that are not records aside, then puts the compacted file in the output's place.
    fn finish(mut self, mut stale: Vec<u64>) -> Result<Compacted, Error> {
        if self.in_place {
            return Ok(self.report);
        }
        let out = self
            .out
            .take()
            .expect("opened when the output stopped being in place")
            .into_inner()
            .map_err(|e| io_err(&self.tmp, e.into_error()))?;
        out.sync_all().map_err(|e| io_err(&self.tmp, e))?;
        drop(out);

        // Move aside first, then replace: a crash in between leaves a line twice, never none.
        stale.sort_unstable();
        if let Some(rdr) = self.src.as_mut() {
            (self.report.stale, self.report.rejected) = move_aside(
                rdr,
                &mut self.pos,
                self.output,
                &stale,
                &self.ix.unreadable,
                self.side,
            )?;
        }
        crate::ledger::files::rename_durably(&self.tmp, self.output)?;
        self.report.rewritten = true;
        // The index file described the old output: the new one's, from what was written. The
        // old index goes first: the two never need memory at once.
        drop(std::mem::take(&mut self.taken));
        drop(std::mem::take(&mut self.ix));
        self.sink.finish(self.output)?;
        Ok(self.report)
    }
}

/// Appends the `stale` lines of the output (read through `rdr`, standing at `pos`) to the
/// stale file and the `unreadable` ones (line number, offset) to the rejected file, each
/// synced, and says so. Returns how many of each.
fn move_aside(
    rdr: &mut BufReader<File>,
    pos: &mut u64,
    output: &Path,
    stale: &[u64],
    unreadable: &[(u64, u64)],
    side: &Sidecars,
) -> Result<(u64, u64), Error> {
    let moved = append_lines(rdr, pos, stale, &side.stale, output)?;
    let offsets: Vec<u64> = unreadable.iter().map(|&(_, o)| o).collect();
    let rejected = append_lines(rdr, pos, &offsets, &side.rejected, output)?;
    if moved > 0 {
        tracing::info!(
            "{}: {} records of rows no longer in the input moved to {}",
            output.display(),
            moved,
            side.stale.display()
        );
    }
    if rejected > 0 {
        tracing::warn!(
            "{}: {} lines that are not records moved to {} (line numbers: {})",
            output.display(),
            rejected,
            side.rejected.display(),
            unreadable
                .iter()
                .take(10)
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((moved, rejected))
}

/// Writes `b` to the compacted file `tmp`.
fn write_out(out: &mut BufWriter<File>, tmp: &Path, b: &[u8]) -> Result<(), Error> {
    out.write_all(b).map_err(|e| io_err(tmp, e))
}

fn read_line_at(
    rdr: &mut BufReader<File>,
    pos: &mut u64,
    offset: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    // Records are mostly in order already, so most moves stay inside the read buffer.
    if offset != *pos {
        rdr.seek_relative(offset as i64 - *pos as i64)?;
    }
    buf.clear();
    let n = rdr.read_until(b'\n', buf)?;
    if buf.last() != Some(&b'\n') {
        buf.push(b'\n');
    }
    *pos = offset + n as u64;
    Ok(())
}

/// Appends the lines at `offsets` to `dest` and syncs it; returns how many.
fn append_lines(
    rdr: &mut BufReader<File>,
    pos: &mut u64,
    offsets: &[u64],
    dest: &Path,
    output: &Path,
) -> Result<u64, Error> {
    if offsets.is_empty() {
        return Ok(0);
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dest)
        .map_err(|e| io_err(dest, e))?;
    let mut w = BufWriter::new(f);
    let mut buf = Vec::new();
    let mut seen = HashSet::new();
    let mut n = 0;
    for &o in offsets {
        if !seen.insert(o) {
            continue;
        }
        read_line_at(rdr, pos, o, &mut buf).map_err(|e| io_err(output, e))?;
        w.write_all(&buf).map_err(|e| io_err(dest, e))?;
        n += 1;
    }
    let f = w.into_inner().map_err(|e| io_err(dest, e.into_error()))?;
    f.sync_all().map_err(|e| io_err(dest, e))?;
    Ok(n)
}

/// Appends a whole file to `dest` (creating it), then removes it: `--fresh` keeps what an
/// earlier output holds instead of deleting it.
pub fn move_appending(from: &Path, dest: &Path) -> Result<bool, Error> {
    let mut f = match File::open(from) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(from, e)),
    };
    let mut d = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dest)
        .map_err(|e| io_err(dest, e))?;
    let nonempty = f.metadata().map_err(|e| io_err(from, e))?.len() > 0;
    if nonempty {
        std::io::copy(&mut f, &mut d).map_err(|e| io_err(dest, e))?;
        d.sync_all().map_err(|e| io_err(dest, e))?;
    }
    std::fs::remove_file(from).map_err(|e| io_err(from, e))?;
    Ok(nonempty)
}

#[cfg(test)]
mod tests {

    use super::*;

    fn rec(row: u64, id: &str, fp: u8, status: &str, extra: &str) -> String {
        format!(
            r#"{{"row":{row},"id":"{id}","status":"{status}","input":{{"t":"{id}"}},"completion":"c{id}","finish_reason":null,"model":null,"usage":null,"cost_usd":0.5,"attempts":1,"latency_ms":1,"fingerprint":"{}","error":{}{extra}}}"#,
            crate::fingerprint::hex(&[fp; 16]),
            if status == "ok" {
                "null".to_string()
            } else {
                r#"{"kind":"server","status":500,"message":"boom"}"#.to_string()
            }
        )
    }

    fn planned(row: u64, fp: u8, input: Option<&str>) -> String {
        let mut p = Planned {
            row,
            fp: crate::fingerprint::hex(&[fp; 16]),
            idh: 0,
            id: None,
            input: None,
            fingerprint: None,
        };
        if let Some(t) = input {
            p.id = Some(row.to_string());
            p.input = Some(serde_json::from_str(&format!(r#"{{"t":"{t}"}}"#)).unwrap());
        }
        serde_json::to_string(&p).unwrap() + "\n"
    }

    fn side(dir: &Path) -> Sidecars {
        Sidecars {
            stale: dir.join("stale.jsonl"),
            rejected: dir.join("rejected.txt"),
        }
    }

    const BY_FP: Keying = Keying { by_id: false };

    #[test]
    fn the_latest_original_wins_and_paid_superseded_records_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let text = [
            rec(1, "1", 1, "error", ""),
            rec(1, "1", 1, "ok", ""),
            rec(2, "2", 2, "ok", ""),
        ]
        .join("\n")
            + "\n";
        std::fs::write(&out, &text).unwrap();
        let ix = Index::load(&out, BY_FP).unwrap();
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.get(&[1; 16], 0).unwrap().unwrap().outcome(), Outcome::Ok);
        assert_eq!(ix.records, 3);
        assert!((ix.spent_usd - 1.5).abs() < 1e-9);
        let spool = dir.path().join("plan");
        std::fs::write(&spool, planned(1, 1, None) + &planned(2, 2, None)).unwrap();
        let c = compact(&out, &Plan::at(&spool), true, BY_FP, &side(dir.path())).unwrap();
        assert_eq!((c.rows, c.stale, c.rewritten), (2, 1, true));
        let stale = std::fs::read_to_string(dir.path().join("stale.jsonl")).unwrap();
        assert!(stale.contains("\"error\""), "{stale}");
    }

    #[test]
    fn compaction_follows_the_input_and_moves_rows_that_left_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let text = [
            rec(1, "1", 1, "ok", ""),
            rec(2, "2", 2, "ok", ""),
            rec(3, "3", 3, "ok", ""),
        ]
        .join("\n")
            + "\n";
        std::fs::write(&out, &text).unwrap();
        // The input is now: a new row (pending), row 3 (renumbered to 2), row 1 (to 3), and a
        // duplicate of the old row 1's request.
        let spool = dir.path().join("plan");
        std::fs::write(
            &spool,
            planned(1, 9, None)
                + &planned(2, 3, Some("3"))
                + &planned(3, 1, Some("1"))
                + &planned(4, 1, Some("dup")),
        )
        .unwrap();
        let c = compact(&out, &Plan::at(&spool), true, BY_FP, &side(dir.path())).unwrap();
        assert_eq!((c.rows, c.pending, c.copies, c.stale), (3, 1, 1, 1));
        let recs: Vec<Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let rows: Vec<(u64, &str)> = recs
            .iter()
            .map(|r| {
                (
                    r["row"].as_u64().unwrap(),
                    r["completion"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(rows, [(2, "c3"), (3, "c1"), (4, "c1")]);
        assert_eq!(recs[2]["copied_from"]["row"], 3);
        assert_eq!(recs[2]["cost_usd"], 0.0);
        assert_eq!(recs[2]["input"]["t"], "dup");
        let stale = std::fs::read_to_string(dir.path().join("stale.jsonl")).unwrap();
        assert!(stale.contains("\"c2\""));
    }

    #[test]
    fn an_unchanged_output_is_not_rewritten_and_foreign_lines_are_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let a = rec(1, "1", 1, "ok", "");
        let b = rec(2, "2", 2, "ok", "");
        std::fs::write(&out, format!("{a}\n{b}\n")).unwrap();
        let spool = dir.path().join("plan");
        std::fs::write(&spool, planned(1, 1, None) + &planned(2, 2, None)).unwrap();
        let c = compact(&out, &Plan::at(&spool), true, BY_FP, &side(dir.path())).unwrap();
        assert!(!c.rewritten);
        std::fs::write(&out, format!("{a}\ngarbage\n{b}\n")).unwrap();
        let c = compact(&out, &Plan::at(&spool), true, BY_FP, &side(dir.path())).unwrap();
        assert_eq!((c.rows, c.rejected, c.rewritten), (2, 1, true));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            format!("{a}\n{b}\n")
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("rejected.txt")).unwrap(),
            "garbage\n"
        );
    }

    /// A row of a plan: its number, its key's byte, where its record is kept (offset, length).
    type Row = (u64, u8, Option<(u64, u32)>);

    /// A plan spool written through `Spool`.
    fn spooled(dir: &Path, rows: &[Row]) -> Plan {
        let mut sp = Spool::create(&dir.join("plan")).unwrap();
        for &(row, fp, kept) in rows {
            let p: Planned = serde_json::from_str(&planned(row, fp, None)).unwrap();
            sp.push(&p, kept).unwrap();
        }
        sp.finish().unwrap()
    }

    #[test]
    fn a_plan_that_keeps_every_record_where_it_stands_skips_compaction_and_no_other_does() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let (a, b) = (
            rec(1, "1", 1, "ok", "") + "\n",
            rec(2, "2", 2, "ok", "") + "\n",
        );
        let (la, lb) = (a.len() as u32, b.len() as u32);
        let whole = spooled(
            dir.path(),
            &[(1, 1, Some((0, la))), (2, 2, Some((la.into(), lb)))],
        );
        assert_eq!(whole.in_place_to, Some(u64::from(la + lb)));
        // A foreign line after the records: the plan no longer covers the output, so
        // compaction runs and sets it aside.
        std::fs::write(&out, format!("{a}{b}garbage\n")).unwrap();
        let c = compact(&out, &whole, true, BY_FP, &side(dir.path())).unwrap();
        assert_eq!((c.rows, c.rejected, c.rewritten), (2, 1, true));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{a}{b}"));
        // Now it does: nothing is read, nothing written.
        std::fs::remove_file(dir.path().join("o.jsonl.index")).ok();
        let c = compact(&out, &whole, true, BY_FP, &side(dir.path())).unwrap();
        assert_eq!((c.rows, c.rewritten), (2, false));
        assert!(!dir.path().join("o.jsonl.index").exists());
        // Out of order, a gap, a row not kept, an unknown length: no proof.
        for rows in [
            vec![(1, 2, Some((la.into(), lb))), (2, 1, Some((0, la)))],
            vec![(1, 1, Some((0, la))), (2, 2, Some((u64::from(la) + 1, lb)))],
            vec![(1, 1, Some((0, la))), (2, 2, None)],
            vec![(1, 1, Some((0, 0))), (2, 2, Some((la.into(), lb)))],
        ] {
            assert_eq!(spooled(dir.path(), &rows).in_place_to, None, "{rows:?}");
        }
    }

    /// The entry compaction makes from a record it rewrote is the one parsing the line gives.
    #[test]
    fn a_rewritten_records_entry_is_the_parsed_lines_entry() {
        let keyings = [BY_FP, Keying { by_id: true }];
        let lines = [
            rec(
                7,
                "a",
                1,
                "ok",
                r#","usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}"#,
            )
            .replace(r#""usage":null,"#, ""),
            rec(8, "b", 2, "error", ""),
            rec(9, "c", 3, "ok", r#","unconfirmed_usd":0.25"#),
        ];
        for keying in keyings {
            for line in &lines {
                for (copy, input) in [(None, None), (Some(Some(3)), Some("x")), (Some(None), None)]
                {
                    let p: Planned = serde_json::from_str(&planned(41, 1, input)).unwrap();
                    let (bytes, made) =
                        rewrite(line.as_bytes(), p, copy, Path::new("o"), 0, keying).unwrap();
                    let parsed = journal::parse_line(&bytes).unwrap().unwrap();
                    let want = entry_of(&parsed, &bytes, 0, keying);
                    assert!(want.is_some_and(|w| w.ident != 0), "{line}");
                    assert_eq!(made, want, "{line} {copy:?}");
                }
            }
        }
    }

    #[test]
    fn a_partial_plan_keeps_the_records_of_rows_not_reached() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let text = [rec(2, "2", 2, "ok", ""), rec(1, "1", 1, "ok", "")].join("\n") + "\n";
        std::fs::write(&out, &text).unwrap();
        let spool = dir.path().join("plan");
        std::fs::write(&spool, planned(1, 1, None)).unwrap();
        let c = compact(&out, &Plan::at(&spool), false, BY_FP, &side(dir.path())).unwrap();
        assert_eq!((c.rows, c.stale), (1, 0));
        let rows: Vec<u64> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["row"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(rows, [1, 2]);
    }

    #[test]
    fn the_index_entry_stays_small() {
        // On disk; in memory only a chunk of them at a time while the index file is built.
        assert_eq!(crate::ledger::index::REC, 64);
        assert!(std::mem::size_of::<Entry>() * crate::ledger::runs::CHUNK < 16 << 20);
    }
}
