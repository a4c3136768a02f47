//! `status`: what is done, failed and pending, per shard, without sending anything.

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::ledger::stamp::Stamp;
use crate::plan::{owns, owns_unreadable};
use crate::shard::Shard;

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
        let job = super::stored::load_viewed(
            file,
            &crate::job::Overrides {
                shard: *sh,
                ..ov.clone()
            },
        )?;
        let planner = Planner::for_job(&job, false)?;
        let carried =
            crate::ledger::Carried::read(&crate::ledger::files::Files::new(&job.output).spend())?;
        let spent = planner.index.spent_usd_with(&carried);
        // A store output by its URL, not its local mirror's path.
        let shown = match &job.remote {
            Some(r) => r.url.to_string(),
            None => job.output.display().to_string(),
        };
        let name = match sh {
            Some(s) => format!("shard {}/{} ({shown})", s.k, s.n),
            None => shown,
        };
        parts.push((
            job,
            planner,
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
    let backend = crate::backend::Backend::for_job(job0, false)?;
    let builder = crate::request::Builder::new(job0, &backend);
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
        crate::ledger::journal::for_each_line(p, |_, _, line| {
            if let Ok(Some(l)) = crate::ledger::journal::parse_line(line) {
                match l.status {
                    crate::ledger::record::Status::Ok => row.ok += 1,
                    crate::ledger::record::Status::Error => row.failed += 1,
                }
                row.spent_usd += l.cost_usd.unwrap_or(0.0) + l.unconfirmed_usd.unwrap_or(0.0);
            }
            Ok(())
        })?;
        let stamp = Stamp::read(&crate::ledger::files::sibling(p, ".job.json"))?;
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
