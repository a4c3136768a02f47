//! `export`: every pending row as an OpenAI batch-format request line, the same lines batch
//! mode uploads, for engines that read that format (vLLM's `run-batch`, LiteLLM, a provider's
//! batch console). `import` reads their results back (see `Pass::open`).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::Error;
use crate::job::Job;
use crate::ledger::files::Pending;
use crate::ledger::journal::io_err;
use crate::plan::{Decision, Planner};
use crate::render::Renderer;
use crate::request::{Builder, Rendered};

/// Writes the pending rows' request lines to `out` (`-`: stdout); returns how many.
pub fn export(
    job: &Job,
    renderer: &Renderer,
    backend: &Backend,
    limit: Option<u64>,
    out: &Path,
) -> Result<u64, Error> {
    let keying = crate::plan::keying(job);
    let mut planner = Planner::for_job(job, false)?;
    let builder = Builder::new(job, backend);
    let stdout = out.as_os_str() == "-";
    // A file is replaced whole, through the ledger's one atomic replace.
    let mut file = if stdout {
        None
    } else {
        Some(Pending::create_as(out, ".part")?)
    };
    let target: PathBuf = match &file {
        Some(p) => p.tmp().to_path_buf(),
        None => PathBuf::from("(stdout)"),
    };
    let mut console = std::io::BufWriter::new(std::io::stdout().lock());
    let w: &mut dyn Write = match file.as_mut() {
        Some(p) => p,
        None => &mut console,
    };
    let stream = job.params.stream.unwrap_or(false);
    let mut line = Vec::with_capacity(4096);
    let mut written = 0u64;
    for item in builder.rendered(job, renderer, limit)? {
        // Unreadable rows have no request to export; `run` reports them.
        let Rendered::Ready(p) = item else { continue };
        let idh = keying.id_hash(&p.row.id);
        if !crate::plan::owns(job, &p) || planner.plan_keyed(&p, idh)? != Decision::Send {
            continue;
        }
        super::write_openai_line(&mut line, &p, idh, stream);
        w.write_all(&line).map_err(|e| io_err(&target, e))?;
        written += 1;
    }
    w.flush().map_err(|e| io_err(&target, e))?;
    if let Some(p) = file {
        p.commit()?;
    }
    Ok(written)
}
