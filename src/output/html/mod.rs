//! The HTML report: one self-contained page (inline CSS, inline SVG charts drawn here, a few
//! lines of JS to filter the table) made from an output file in one streaming pass. Memory does
//! not grow with the output: histograms have fixed buckets, time is binned per minute (coarser
//! if the bins would pass a fixed number), and the table, which holds the first rows and every
//! failed one, is spooled to disk until the charts above it are known.
//!
//! Everything from the model or the input goes through `escape` (text and attribute values
//! alike) or, inside the one `<script type="application/json">`, through `json_for_script`:
//! a completion holding `<script>` is shown, never run.
//!
//! `tally` sums the records into the figures, `table` writes the rows, `svg` draws the charts,
//! `page` puts the page around them, and `text` holds the escaping and the number formats
//! they all use.

mod page;
mod svg;
mod table;
mod tally;
mod text;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::Error;
use crate::ledger::files::Files;
use crate::ledger::journal::{self, io_err};
use crate::report::Summary;
use page::Page;
use table::Table;
use tally::Tally;

/// What the report is made with.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The table's first rows.
    pub rows: usize,
    /// Failed rows past the first `rows` the table holds too; the page says how many more.
    pub failed_rows: usize,
    /// The last run's summary; `None`: read `OUTPUT.summary.json` if there is one.
    pub summary: Option<Summary>,
}

/// What went into a written report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub records: u64,
    pub table_rows: u64,
    /// Failed rows past both caps, left out of the table.
    pub failed_left: u64,
}

/// Writes the report of the output `output` to `target` (through a temporary file, renamed
/// into place, so a reader never sees half a report).
pub fn write(output: &Path, target: &Path, opts: &Options) -> Result<Written, Error> {
    let source = std::fs::canonicalize(output).map_err(|e| io_err(output, e))?;
    // `-o` naming the output itself would replace paid-for records with HTML.
    if std::fs::canonicalize(target).is_ok_and(|t| t == source) {
        return Err(Error::Other(format!(
            "{}: the report would overwrite the output itself; choose another file",
            target.display()
        )));
    }
    let summary = match &opts.summary {
        Some(s) => Some(s.clone()),
        None => read_summary(&Files::new(output).summary()),
    };
    let spool_path = crate::ledger::files::sibling(target, ".rows.tmp");
    let result = (|| {
        let spool = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&spool_path)
            .map_err(|e| io_err(&spool_path, e))?;
        let mut table = Table::new(
            BufWriter::with_capacity(256 * 1024, spool),
            opts.rows,
            opts.failed_rows,
        );
        let mut tally = Tally::default();
        journal::for_each_line(output, |_, _, bytes| {
            let Ok(Some(line)) = journal::parse_line(bytes) else {
                if !bytes.trim_ascii().is_empty() {
                    tally.unreadable += 1;
                }
                return Ok(());
            };
            tally.add(&line);
            table
                .offer(&line, bytes)
                .map_err(|e| io_err(&spool_path, e))
        })?;
        let (table_rows, failed_left) = (table.rows, table.failed_left);
        let mut spool = table.out.into_inner().map_err(|e| {
            let err = e.error();
            io_err(
                &spool_path,
                std::io::Error::new(err.kind(), err.to_string()),
            )
        })?;
        let stale = count_records(&Files::new(output).stale())?;
        let page = Page {
            output,
            tally: &tally,
            summary: summary.as_ref(),
            stale,
            table_rows,
            table_cap: opts.rows,
            failed_left,
        };
        write_page(target, &page, &mut spool)?;
        Ok(Written {
            records: tally.records,
            table_rows,
            failed_left,
        })
    })();
    let _ = std::fs::remove_file(&spool_path);
    result
}

/// The page in place of `target`, through the ledger's one atomic replace: its head, the
/// table's rows from the spool, its tail.
fn write_page(target: &Path, page: &Page, spool: &mut File) -> Result<(), Error> {
    use std::io::Seek;
    crate::ledger::files::replace(target, |w| {
        w.write_all(page.head().as_bytes())?;
        spool.seek(std::io::SeekFrom::Start(0))?;
        std::io::copy(spool, w)?;
        w.write_all(page.tail().as_bytes())
    })
}

fn read_summary(path: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records in a companion file (the stale file); 0 when it does not exist.
fn count_records(path: &Path) -> Result<u64, Error> {
    let mut n = 0;
    journal::for_each_line(path, |_, _, bytes| {
        if let Ok(Some(_)) = journal::parse_line(bytes) {
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}
