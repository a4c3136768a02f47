//! The commands over outputs: `merge`, `status`, `export`, `report`.

use std::path::Path;

use crate::cli::JobArgs;
use crate::error::{Error, EXIT_OK};
use crate::job::Overrides;
use crate::render::Renderer;
use crate::shard::Shard;

use super::job_overrides;

/// `promptmill report`: the path on stdout, what went in on stderr.
pub(super) fn report(
    output: &Path,
    out: Option<std::path::PathBuf>,
    (rows, failed_rows): (usize, usize),
    quiet: bool,
) -> Result<i32, Error> {
    let target = out.unwrap_or_else(|| crate::ledger::files::report_path(output));
    let opts = crate::output::html::Options {
        rows,
        failed_rows,
        summary: None,
    };
    let w = crate::output::html::write(output, &target, &opts)?;
    if !quiet {
        let left = if w.failed_left > 0 {
            format!(
                " ({} more failed rows left out: --failed-rows N)",
                w.failed_left
            )
        } else {
            String::new()
        };
        eprintln!(
            "{} records, {} of them in the table{left}",
            w.records, w.table_rows
        );
    }
    println!("{}", target.display());
    Ok(EXIT_OK)
}

/// Without -o: the first output's name without its shard tag (on the store if it is there).
fn unsharded_target(
    named: &[(std::path::PathBuf, Option<crate::store::Url>)],
) -> Result<std::path::PathBuf, Error> {
    let first = named.first().and_then(|(p, u)| match u {
        Some(u) => crate::output::merge::unsharded(Path::new(&u.to_string())),
        None => crate::output::merge::unsharded(p),
    });
    first.ok_or_else(|| {
        Error::Other(
            "merge: name the merged output with -o (the inputs are not shard outputs)".into(),
        )
    })
}

pub(super) fn merge(
    outputs: &[String],
    output: Option<std::path::PathBuf>,
    csv: Option<std::path::PathBuf>,
    parquet: Option<std::path::PathBuf>,
    quiet: bool,
) -> Result<i32, Error> {
    let named = super::stored::expand(outputs, true)?;
    let inputs: Vec<std::path::PathBuf> = named.iter().map(|(p, _)| p.clone()).collect();
    let output = match output {
        Some(o) => o,
        None => unsharded_target(&named)?,
    };
    let target = match (
        output.to_str().filter(|s| crate::store::is_url(s)),
        inputs.first(),
    ) {
        (Some(s), Some(first)) => Some(super::stored::Target::open(
            s,
            csv.as_deref(),
            parquet.as_deref(),
            first,
        )?),
        _ => None,
    };
    let (output, csv, parquet) = match &target {
        Some(t) => (t.local.clone(), t.csv.clone(), t.parquet.clone()),
        None => (output, csv, parquet),
    };
    let m = crate::output::merge::merge(&inputs, &output, csv.as_deref(), parquet.as_deref())?;
    if let Some(t) = target {
        let url = t.url().clone();
        t.publish()?;
        eprintln!("published to {url}");
    }
    Ok(tell_merged(&m, inputs.len(), &output, quiet))
}

/// What a merge did, on stderr; the exit code (rows in no shard's output fail it).
fn tell_merged(m: &crate::output::merge::Merged, inputs: usize, output: &Path, quiet: bool) -> i32 {
    if !quiet {
        eprint!("{}", m.summary.table());
    }
    if let Some(prev) = &m.kept {
        eprintln!(
            "{} was there already: its records were moved to {} (appended), not lost",
            output.display(),
            prev.display()
        );
    }
    if let Some((csv, n)) = &m.csv {
        eprintln!("CSV of {n} records written to {}", csv.display());
    }
    if let Some((pq, n)) = &m.parquet {
        eprintln!("Parquet of {n} records written to {}", pq.display());
    }
    eprintln!(
        "merged {} outputs: {} rows into {}{}",
        inputs,
        m.rows,
        output.display(),
        if m.overlapping > 0 {
            format!(
                " ({} rows were in more than one shard: one record kept)",
                m.overlapping
            )
        } else {
            String::new()
        }
    );
    if m.missing > 0 {
        eprintln!(
            "{} rows are in no shard's output (rows {}{}): run the shards again to finish them",
            m.missing,
            m.missing_first
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if m.missing > m.missing_first.len() as u64 {
                ", …"
            } else {
                ""
            }
        );
        return crate::error::EXIT_ROWS_FAILED;
    }
    EXIT_OK
}

pub(super) fn status(
    targets: &[String],
    input: Option<std::path::PathBuf>,
    shard: Option<Shard>,
    shards: Option<u32>,
) -> Result<i32, Error> {
    let is_job = targets.len() == 1 && targets[0].ends_with(".toml");
    let rows = if is_job {
        let file = Path::new(&targets[0]);
        let ov = Overrides {
            input,
            ..Default::default()
        };
        // Without --shard or --shards, the shard outputs found beside the output, if any.
        let shards = match (shard, shards) {
            (None, None) => shards_beside(&super::stored::load_viewed(file, &ov)?.output),
            _ => shards,
        };
        let list: Vec<Option<Shard>> = match (shard, shards) {
            (Some(s), _) => vec![Some(s)],
            (None, Some(n)) => (1..=n).map(|k| Shard::new(k, n)).collect(),
            (None, None) => vec![None],
        };
        super::status::status_of_job(file, &ov, &list)?
    } else {
        let named = super::stored::expand(targets, false)?;
        let paths: Vec<std::path::PathBuf> = named.iter().map(|(p, _)| p.clone()).collect();
        let mut rows = super::status::status_of_outputs(&paths)?;
        for (row, (_, url)) in rows.iter_mut().zip(&named) {
            if let Some(u) = url {
                row.name = u.to_string();
            }
        }
        rows
    };
    print!("{}", super::status::status_table(&rows));
    Ok(EXIT_OK)
}

pub(super) fn export(args: &JobArgs, out: &Path) -> Result<i32, Error> {
    let job = super::stored::load_viewed(&args.job, &job_overrides(args)?)?;
    let renderer = Renderer::new(&job)?;
    let backend = crate::backend::Backend::for_job(&job, false)?;
    let n = crate::exec::batch::export::export(&job, &renderer, &backend, args.limit, out)?;
    eprintln!(
        "{n} pending requests written to {} (OpenAI batch format: run them with any engine that \
         reads it, then `promptmill import {} RESULTS.jsonl`)",
        out.display(),
        args.job.display()
    );
    Ok(EXIT_OK)
}

/// How many shards the outputs beside `output` were split into (`x.shard-K-of-N.jsonl`), when
/// the unsharded output itself is not there and they all agree on N.
fn shards_beside(output: &Path) -> Option<u32> {
    if output.exists() {
        return None;
    }
    let probe = Shard::new(1, 1)?.path(output);
    let name = probe
        .file_name()?
        .to_string_lossy()
        .replace("shard-1-of-1", "shard-*-of-*");
    let pattern = probe.with_file_name(name);
    let found = crate::output::merge::expand(&[pattern.to_string_lossy().into_owned()]).ok()?;
    let mut ns = found.iter().filter_map(|p| {
        let name = p.file_name()?.to_string_lossy().into_owned();
        let tag = name.split(".shard-").nth(1)?;
        tag.split('.')
            .next()?
            .split_once("-of-")?
            .1
            .parse::<u32>()
            .ok()
    });
    let n = ns.next()?;
    ns.all(|m| m == n).then_some(n)
}
