//! The commands, wired from the CLI to the library: logging, `.env`, the runtime, Ctrl-C, and
//! the one place an error becomes a message and an exit code.

use std::io::IsTerminal;
use std::path::Path;

use crate::cli::{BatchAction, Cli, Command, JobArgs, LogFormat, RunArgs};
use crate::error::{Error, EXIT_OK, EXIT_STOPPED};
use crate::job::{Job, Mode, Overrides, ProviderKind, ASSUMED_MAX_OUTPUT};
use crate::ledger::Index;
use crate::plan::{Decision, Planner};
use crate::provider::{self, is_loopback};
use crate::render::Renderer;
use crate::request::{Builder, Rendered};
use crate::schedule::{self, Interrupt, RunOptions, Signals};
use crate::shard::Shard;

pub fn main(cli: Cli) -> i32 {
    ignore_file_size_signal();
    // A .env in the working folder supplies the key without exporting it; an existing
    // variable wins over the file. Read before logging starts, so NO_COLOR there counts too.
    let _ = dotenvy::dotenv();
    init_logging(&cli);
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            e.exit_code()
        }
    }
}

fn report_error(e: &Error) {
    eprintln!("error: {e}");
    if let Some(h) = e.hint() {
        eprintln!("hint: {h}");
    }
}

fn init_logging(cli: &Cli) {
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    // llama.cpp's own warnings (about the model file's metadata) are not the user's business.
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("PROMPTMILL_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("warn,promptmill={level},llama-cpp-2=error"))
        });
    // Colour is for a person at a terminal: a log file or a pipe gets plain text, and a
    // non-empty NO_COLOR (https://no-color.org) turns it off even at a terminal.
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

fn dispatch(cli: Cli) -> Result<i32, Error> {
    let quiet = cli.quiet;
    let json_logs = cli.log_format == LogFormat::Json;
    match cli.command {
        Command::Run(args) if args.dry_run => estimate(&args.job, &overrides(&args)?),
        Command::Run(args) => run(args, quiet, json_logs),
        Command::Estimate(args) => estimate(&args, &job_overrides(&args)?),
        Command::Render { job, row } => render(&job, row),
        Command::Validate { job, input } => validate(&job, input),
        Command::Batch { action } => batch(action, quiet, json_logs),
        Command::Merge {
            outputs,
            output,
            csv,
        } => merge(&outputs, output, csv, quiet),
        Command::Status {
            targets,
            input,
            shard,
            shards,
        } => status(&targets, input, shard, shards),
        Command::Export { job, out } => export(&job, &out),
        Command::Import { job, results } => {
            let opts = RunOptions::collect(job.limit, quiet, Some(results));
            passes(&job.job, &job_overrides(&job)?, opts, false, json_logs)
        }
        Command::FetchModel { list: true, .. } => {
            print!("{}", crate::models::list_models());
            Ok(EXIT_OK)
        }
        Command::FetchModel { name, .. } => {
            let p = crate::models::fetch_model(name.as_deref(), quiet)?;
            println!("{}", p.display());
            Ok(EXIT_OK)
        }
        Command::Report { output, out, rows } => report(&output, out, rows, quiet),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "promptmill",
                &mut std::io::stdout(),
            );
            Ok(EXIT_OK)
        }
    }
}

/// `promptmill report`: the path on stdout, what went in on stderr.
fn report(
    output: &Path,
    out: Option<std::path::PathBuf>,
    rows: usize,
    quiet: bool,
) -> Result<i32, Error> {
    let target = out.unwrap_or_else(|| crate::job::report_path(output));
    let opts = crate::report_html::Options {
        rows,
        summary: None,
    };
    let w = crate::report_html::write(output, &target, &opts)?;
    if !quiet {
        eprintln!(
            "{} records, {} of them in the table",
            w.records, w.table_rows
        );
    }
    println!("{}", target.display());
    Ok(EXIT_OK)
}

/// The run's HTML report. Failing to write it is a warning: the run's outcome and exit code
/// stand whatever happens here.
fn run_report(job: &RunReport, summary: &crate::report::Summary) -> Option<std::path::PathBuf> {
    if !job.on {
        return None;
    }
    let opts = crate::report_html::Options {
        rows: job.rows,
        summary: Some(summary.clone()),
    };
    match crate::report_html::write(&job.output, &job.path, &opts) {
        Ok(_) => Some(job.path.clone()),
        Err(e) => {
            tracing::warn!("cannot write the report {}: {e}", job.path.display());
            None
        }
    }
}

/// What `run` needs to know of the job to write its report once the job has been moved into
/// the run.
struct RunReport {
    on: bool,
    output: std::path::PathBuf,
    path: std::path::PathBuf,
    rows: usize,
}

fn job_overrides(a: &JobArgs) -> Result<Overrides, Error> {
    Ok(Overrides {
        input: a.input.clone(),
        output: a.output.clone(),
        shard: shard_of(a.shard, a.shards)?,
        ..Default::default()
    })
}

/// `--shard K/N`, or `--shards N` with K from `JOB_COMPLETION_INDEX`.
fn shard_of(shard: Option<Shard>, shards: Option<u32>) -> Result<Option<Shard>, Error> {
    match (shard, shards) {
        (Some(s), Some(n)) if s.n != n => Err(Error::Other(format!(
            "--shard {}/{} and --shards {n} disagree",
            s.k, s.n
        ))),
        (Some(s), _) => Ok(Some(s)),
        (None, Some(n)) => Shard::from_env(n).map(Some).map_err(Error::Other),
        (None, None) => Ok(None),
    }
}

fn overrides(a: &RunArgs) -> Result<Overrides, Error> {
    Ok(Overrides {
        concurrency: a.concurrency,
        rpm: a.rpm,
        tpm: a.tpm,
        max_cost_usd: a.max_cost,
        mode: a.mode,
        ..job_overrides(&a.job)?
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))
}

fn run(args: RunArgs, quiet: bool, json_logs: bool) -> Result<i32, Error> {
    let opts = RunOptions {
        limit: args.job.limit,
        fresh: args.fresh,
        retry_failed: args.retry_failed,
        quiet,
        collect_only: false,
        import: None,
    };
    passes(
        &args.job.job,
        &overrides(&args)?,
        opts,
        args.wait,
        json_logs,
    )
}

fn batch(action: BatchAction, quiet: bool, json_logs: bool) -> Result<i32, Error> {
    match action {
        BatchAction::Status(a) => {
            let job = Job::load(&a.job, &job_overrides(&a)?)?;
            for line in runtime()?.block_on(crate::batch::status(&job))? {
                println!("{line}");
            }
            Ok(EXIT_OK)
        }
        BatchAction::Cancel(a) => {
            let job = Job::load(&a.job, &job_overrides(&a)?)?;
            for line in runtime()?.block_on(crate::batch::cancel(&job))? {
                println!("{line}");
            }
            eprintln!(
                "what the batches finished is kept: `promptmill batch collect {}` writes it",
                a.job.display()
            );
            Ok(EXIT_OK)
        }
        BatchAction::Collect { job, wait } => {
            let opts = RunOptions::collect(job.limit, quiet, None);
            passes(&job.job, &job_overrides(&job)?, opts, wait, json_logs)
        }
    }
}

/// Runs the job once, or, with `wait`, again each time a batch it waits for ends, until no
/// batch is running.
fn passes(
    file: &Path,
    ov: &Overrides,
    mut opts: RunOptions,
    wait: bool,
    json_logs: bool,
) -> Result<i32, Error> {
    let rt = runtime()?;
    let signals = Signals::default();
    let mut listening = false;
    loop {
        let job = Job::load(file, ov)?;
        if !listening {
            let (s, grace) = (signals.clone(), job.shutdown_grace);
            rt.block_on(async move { listen_for_signals(&s, grace) })?;
            listening = true;
        }
        let renderer = Renderer::new(&job)?;
        let backend = provider::build(&job, true)?;
        let output = job.output.clone();
        let csv = job.csv.clone();
        let summary_path = job.summary_path();
        let report = RunReport {
            on: job.report,
            output: job.output.clone(),
            path: job.report_path(),
            rows: job.report_rows,
        };
        let quiet = opts.quiet;
        let pass_opts = RunOptions {
            fresh: std::mem::take(&mut opts.fresh),
            import: opts.import.clone(),
            ..opts
        };
        let for_wait = Job::load(file, ov)?;
        let (summary, code) = rt.block_on(schedule::run(
            job,
            pass_opts,
            backend,
            renderer,
            signals.clone(),
        ))?;
        print_summary(
            &summary,
            code,
            quiet,
            json_logs,
            &output,
            csv.as_deref(),
            &summary_path,
            &report,
        );
        let running = summary
            .batch
            .is_some_and(|b| b.batches_submitted + b.batches_running > 0);
        let go_on = running && code < EXIT_STOPPED;
        if !(go_on && wait) {
            if go_on {
                eprintln!(
                    "batches are running: `promptmill batch status {f}` shows them, \
                     `promptmill batch collect {f}` (or this command again) collects what has \
                     ended; `--wait` waits for them",
                    f = file.display()
                );
            }
            rt.shutdown_background();
            return Ok(code);
        }
        let ended = rt.block_on(crate::batch::wait_any(&for_wait, &signals, quiet))?;
        if !ended {
            rt.shutdown_background();
            let i = signals
                .interrupted()
                .map_or(EXIT_STOPPED, |i| i.exit_code());
            eprintln!(
                "stopped waiting; the batches go on on the server: `promptmill batch collect {}` \
                 collects them",
                file.display()
            );
            return Ok(i);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn print_summary(
    summary: &crate::report::Summary,
    code: i32,
    quiet: bool,
    json_logs: bool,
    output: &Path,
    csv: Option<&Path>,
    summary_path: &Path,
    report: &RunReport,
) {
    if json_logs {
        // Log collectors get the summary as one structured event, not a table.
        let fields = serde_json::to_string(summary).unwrap_or_default();
        let csv = csv.map(|c| c.display().to_string());
        let report = run_report(report, summary).map(|p| p.display().to_string());
        tracing::info!(summary = %fields, output = %output.display(), csv = ?csv, report = ?report, "run finished");
        return;
    }
    if !quiet || code != EXIT_OK {
        eprint!("{}", summary.table());
    }
    let report = run_report(report, summary);
    eprintln!("output: {}", output.display());
    if let Some(c) = csv {
        eprintln!("csv: {}", c.display());
    }
    eprintln!("summary: {}", summary_path.display());
    if let Some(r) = report {
        eprintln!("report: {}", r.display());
    }
}

fn merge(
    outputs: &[String],
    output: Option<std::path::PathBuf>,
    csv: Option<std::path::PathBuf>,
    quiet: bool,
) -> Result<i32, Error> {
    let inputs = crate::shard::expand(outputs)?;
    let output = match output {
        Some(o) => o,
        None => inputs
            .first()
            .and_then(|p| crate::shard::unsharded(p))
            .ok_or_else(|| {
                Error::Other(
                    "merge: name the merged output with -o (the inputs are not shard outputs)"
                        .into(),
                )
            })?,
    };
    let m = crate::shard::merge(&inputs, &output, csv.as_deref())?;
    if !quiet {
        eprint!("{}", m.summary.table());
    }
    eprintln!(
        "merged {} outputs: {} rows into {}{}",
        inputs.len(),
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
        return Ok(crate::error::EXIT_ROWS_FAILED);
    }
    Ok(EXIT_OK)
}

fn status(
    targets: &[String],
    input: Option<std::path::PathBuf>,
    shard: Option<Shard>,
    shards: Option<u32>,
) -> Result<i32, Error> {
    let is_job = targets.len() == 1 && targets[0].ends_with(".toml");
    let rows = if is_job {
        let file = Path::new(&targets[0]);
        let list: Vec<Option<Shard>> = match (shard, shards) {
            (Some(s), _) => vec![Some(s)],
            (None, Some(n)) => (1..=n).map(|k| Shard::new(k, n)).collect(),
            (None, None) => vec![None],
        };
        let ov = Overrides {
            input,
            ..Default::default()
        };
        crate::shard::status_of_job(file, &ov, &list)?
    } else {
        crate::shard::status_of_outputs(&crate::shard::expand(targets)?)?
    };
    print!("{}", crate::shard::status_table(&rows));
    Ok(EXIT_OK)
}

fn export(args: &JobArgs, out: &Path) -> Result<i32, Error> {
    let job = Job::load(&args.job, &job_overrides(args)?)?;
    let renderer = Renderer::new(&job)?;
    let backend = provider::build(&job, false)?;
    let n = crate::batch::export::export(&job, &renderer, &backend, args.limit, out)?;
    eprintln!(
        "{n} pending requests written to {} (OpenAI batch format: run them with any engine that \
         reads it, then `promptmill import {} RESULTS.jsonl`)",
        out.display(),
        args.job.display()
    );
    Ok(EXIT_OK)
}

/// Ctrl-C and SIGTERM (systemd, docker stop, Kubernetes, `timeout`) stop the run the same
/// way: no new requests, those in flight get `grace`, a second signal cancels them; every
/// record received is written and the summary printed either way.
fn listen_for_signals(signals: &Signals, grace: std::time::Duration) -> Result<(), Error> {
    let s = signals.clone();
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            s.interrupt(Interrupt::CtrlC, grace);
        }
    });
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::Other(format!("cannot listen for SIGTERM: {e}")))?;
        let s = signals.clone();
        tokio::spawn(async move {
            while term.recv().await.is_some() {
                s.interrupt(Interrupt::Term, grace);
            }
        });
    }
    Ok(())
}

/// A file-size limit (`ulimit -f`) must be an I/O error the writer can stop on, not a
/// signal that kills the process with rows in flight.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN at start-up, before any thread runs.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// The dry run's images: how many, their prompt tokens, how many of those were assumed.
#[derive(Default)]
struct ImageStats {
    count: u64,
    tokens: u64,
    assumed: u64,
}

fn estimate(args: &JobArgs, ov: &Overrides) -> Result<i32, Error> {
    let job = Job::load(&args.job, ov)?;
    let renderer = Renderer::new(&job)?;
    let backend = provider::build(&job, false)?;
    let keying = schedule::keying(&job);
    let index = Index::load(&job.output, keying)?.with_stale(&job.stale_path(), keying)?;
    let mean_completion = index.mean_completion_tokens;
    // The run's own planner, so "rows to send" is what `run` would send.
    let mut planner = Planner::new(index, keying, false, None);
    let builder = Builder::new(&job, &backend.identity);
    let price = backend.price_for(None, &job.model);
    let schema_tokens = schedule::schema_tokens(&job, &*backend.counter);
    let max_out = job.params.max_output_tokens();
    let (mut rows, mut bad, mut done, mut copies, mut prompt, mut prompt_todo, mut to_send) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    // Batch mode: the files the run would write, split by the same rule.
    let batched = job.mode == Mode::Batch;
    let mut splitter = crate::batch::Splitter::new(job.batch.clone());
    let mut too_big = 0u64;
    let mut images = ImageStats::default();
    let mut line = Vec::new();
    let stream = job.params.stream.unwrap_or(false);
    for item in builder.rendered(&job, &renderer, args.limit)? {
        rows += 1;
        let p = match item {
            Rendered::Ready(p) => p,
            Rendered::Unreadable(number) => {
                bad += u64::from(crate::shard::owns_unreadable(&job, number));
                continue;
            }
        };
        if !crate::shard::owns(&job, &p) {
            continue;
        }
        let n = backend.counter.count_prompt(&p.request.messages) + schema_tokens;
        prompt += n;
        for img in p.request.messages.iter().flat_map(|m| m.content.images()) {
            let t = crate::tokens::image_tokens(&job.model, img);
            images.count += 1;
            images.tokens += t.tokens;
            images.assumed += u64::from(t.assumed);
        }
        match planner.plan(&p)? {
            Decision::Send => {
                to_send += 1;
                prompt_todo += n;
                if batched {
                    let idh = keying.id_hash(&p.row.id);
                    crate::batch::write_openai_line(&mut line, &p, idh, stream);
                    let len = line.len() as u64;
                    if splitter.check(len).is_err() {
                        too_big += 1;
                    } else {
                        splitter.add(len);
                    }
                }
            }
            Decision::Copy => copies += 1,
            Decision::Done | Decision::DoneFailed | Decision::WriteError => done += 1,
        }
    }
    // `n` choices per request are billed as n times the output.
    let out_cap = max_out.unwrap_or(ASSUMED_MAX_OUTPUT) * job.params.choices();
    // Expected output: what earlier rows of this job really used, else half the cap.
    let (expected_out, basis) = match mean_completion {
        Some(m) => (m, "the mean of earlier rows of this output"),
        None => (out_cap as f64 / 2.0, "assumed: half of max_tokens"),
    };
    let usd = |v: Option<f64>| {
        v.map(|c| format!("${c:.6}"))
            .unwrap_or_else(|| "unknown (no price for this model; set [pricing])".into())
    };
    let bound = price.map(|p| p.bound(prompt_todo, out_cap * to_send));
    let expected = price
        .map(|p| (prompt_todo as f64 * p.input + expected_out * to_send as f64 * p.output) / 1e6);
    println!("job               {}", job.file.display());
    println!(
        "model             {}{}",
        job.model,
        if batched {
            " (Batch API: batch prices)"
        } else {
            ""
        }
    );
    println!("rows              {rows} ({bad} unreadable or unrenderable)");
    println!("already done      {done}");
    println!("same request      {copies} (copied from another row, not sent)");
    println!("rows to send      {to_send}");
    println!("prompt tokens     {prompt} (to send: {prompt_todo})");
    if schema_tokens > 0 {
        println!(
            "  of which schema  {schema_tokens} per row (its JSON text, counted with the model's \
             tokenizer: OpenAI bills the schema as prompt tokens but does not publish exactly \
             how, so this is an estimate)"
        );
    }
    if images.count > 0 {
        println!(
            "images            {} ({} prompt tokens of the above, by OpenAI's tile rule{})",
            images.count,
            images.tokens,
            if images.assumed > 0 {
                format!(
                    "; {} https URLs not fetched, assumed {}×{} at high detail",
                    images.assumed,
                    crate::tokens::ASSUMED_IMAGE_SIZE.0,
                    crate::tokens::ASSUMED_IMAGE_SIZE.1
                )
            } else {
                String::new()
            }
        );
    }
    println!(
        "max output tokens {}{}",
        out_cap * to_send,
        if max_out.is_none() {
            format!(" (no max_tokens set: {ASSUMED_MAX_OUTPUT} per row assumed)")
        } else {
            String::new()
        }
    );
    println!(
        "cost bound        {} (every row uses all of max_tokens)",
        usd(bound)
    );
    println!(
        "expected cost     {} ({expected_out:.0} output tokens per row, {basis})",
        usd(expected)
    );
    if batched {
        println!(
            "batch files       {} (at most {} requests and {} bytes each; one batch per file)",
            splitter.files.len(),
            job.batch.max_requests_per_file,
            job.batch.max_bytes_per_file
        );
        for (i, (n, b)) in splitter.files.iter().enumerate() {
            println!("  file {:<4}       {n} requests, {b} bytes", i + 1);
        }
        if too_big > 0 {
            println!("too large         {too_big} requests are over the file size limit alone");
        }
    }
    Ok(EXIT_OK)
}

fn render(args: &JobArgs, row: u64) -> Result<i32, Error> {
    let job = Job::load(&args.job, &job_overrides(args)?)?;
    let renderer = Renderer::new(&job)?;
    let backend = provider::build(&job, false)?;
    let builder = Builder::new(&job, &backend.identity);
    let source = job.source();
    for r in source.reader()? {
        let number = match &r {
            Ok(r) => r.number,
            Err(e) => e.number,
        };
        if number != row {
            continue;
        }
        let r = r.map_err(|e| Error::Input {
            path: job.input.clone(),
            message: e.message,
        })?;
        let p = builder
            .prepare(&job.input, &renderer, r)
            .map_err(|(_, m)| Error::Input {
                path: job.input.clone(),
                message: m,
            })?;
        for m in &p.request.messages {
            match &m.name {
                Some(n) => println!("--- {} ({n})", m.role.as_str()),
                None => println!("--- {}", m.role.as_str()),
            }
            print_content(&m.content);
        }
        println!("--- fingerprint {}", crate::request::hex(&p.fingerprint));
        return Ok(EXIT_OK);
    }
    Err(Error::Input {
        path: job.input.clone(),
        message: format!("there is no row {row}"),
    })
}

/// A message's content as `render` shows it: the text, then one line per image (a data URL
/// by its type and size, not its base64).
fn print_content(content: &crate::chat::Content) {
    use crate::chat::{Content, Part};
    let parts = match content {
        Content::Text(t) => return println!("{t}"),
        Content::Parts(p) => p,
    };
    for p in parts {
        match p {
            Part::Text { text } => println!("{text}"),
            Part::ImageUrl { image_url: i } => {
                let url = match i.url.split_once(";base64,") {
                    Some((head, data)) if head.starts_with("data:") => {
                        let pad = data.bytes().rev().take_while(|&b| b == b'=').count();
                        format!("{head} ({} bytes)", data.len() / 4 * 3 - pad)
                    }
                    _ => i.url.clone(),
                };
                let size = i.size.map(|(w, h)| format!(" {w}×{h}")).unwrap_or_default();
                let detail = i
                    .detail
                    .map(|d| format!(" detail={}", d.as_str()))
                    .unwrap_or_default();
                println!("[image: {url}{size}{detail}]");
            }
        }
    }
}

/// Lists every problem, each with its location, rather than stopping at the first.
fn validate(path: &Path, input: Option<std::path::PathBuf>) -> Result<i32, Error> {
    let job = Job::load(
        path,
        &Overrides {
            input,
            ..Default::default()
        },
    )?;
    let mut problems = Vec::new();
    let renderer = match Renderer::new(&job) {
        Ok(r) => Some(r),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let source = job.source();
    let columns = match source.columns() {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    if let (Some(r), Some(cols)) = (&renderer, &columns) {
        for (var, template) in r.variables() {
            if !cols.contains(&var) {
                problems.push(format!(
                    "template {template}: variable `{var}` is not a column of {} (columns: {})",
                    crate::input::describe(&job.input),
                    cols.join(", ")
                ));
            }
        }
        for (field, message) in r.from_fields() {
            if !cols.contains(&field) {
                problems.push(format!(
                    "{}: `{message}`: `{field}` is not a column of {} (columns: {})",
                    path.display(),
                    crate::input::describe(&job.input),
                    cols.join(", ")
                ));
            }
        }
    }
    if job.provider == ProviderKind::Openai
        && std::env::var(&job.api_key_env).is_err()
        && !is_loopback(&job.base_url)
    {
        problems.push(format!(
            "{}: the API key variable {} is not set (environment or .env)",
            path.display(),
            job.api_key_env
        ));
    }
    if job.provider == ProviderKind::Local {
        if let Ok(p) = provider::local_model_path(&job) {
            if !p.is_file() {
                problems.push(format!(
                    "model {}: not found; run `promptmill fetch-model`",
                    p.display()
                ));
            }
        }
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        Ok(EXIT_OK)
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s)", problems.len());
        Ok(EXIT_STOPPED)
    }
}
