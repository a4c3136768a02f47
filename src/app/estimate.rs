//! `estimate` and `run --dry-run`: what the job would send and cost, offline.

use crate::chat::Mode;
use crate::cli::JobArgs;
use crate::error::{Error, EXIT_OK};
use crate::exec::{self};
use crate::job::{Job, Overrides, ASSUMED_MAX_OUTPUT};
use crate::plan::{Decision, Planner};
use crate::provider::anthropic::{min_cached_tokens, PromptCache};
use crate::render::Renderer;
use crate::request::{Builder, Rendered};

/// The dry run's images: how many, their prompt tokens, how many of those were assumed.
#[derive(Default)]
pub(super) struct ImageStats {
    count: u64,
    tokens: u64,
    assumed: u64,
}

/// What the dry run counted, row by row, with the run's own planner.
#[derive(Default)]
struct Tally {
    rows: u64,
    bad: u64,
    done: u64,
    copies: u64,
    prompt: u64,
    prompt_todo: u64,
    to_send: u64,
    images: ImageStats,
    /// Batch mode: the files the run would write, split by the same rule.
    files: Vec<(u64, u64)>,
    too_big: u64,
    /// The leading messages every row shares, and their prompt tokens (first row's count).
    prefix: Option<(usize, u64)>,
}

pub(super) fn estimate(args: &JobArgs, ov: &Overrides, retry_failed: bool) -> Result<i32, Error> {
    let job = super::stored::load_viewed(&args.job, ov)?;
    let renderer = Renderer::new(&job)?;
    let backend = crate::backend::Backend::for_job(&job, false)?;
    // The run's own planner, so "rows to send" is what `run` would send.
    let mut planner = Planner::for_job(&job, retry_failed)?;
    let mean_completion = planner.index.mean_completion_tokens;
    let schema_tokens = exec::schema_tokens(&job, &*backend.counter);
    let t = tally(
        &job,
        &renderer,
        &backend,
        &mut planner,
        args.limit,
        schema_tokens,
    )?;
    print_rows(&job, &t, schema_tokens, backend.counter.is_estimate());
    let price = backend.price_for(None, &job.served.model);
    print_cost(&job, &t, price, mean_completion);
    print_cache(&job, &t, price);
    Ok(EXIT_OK)
}

/// Renders and plans every row (or the first `limit`), counting what the run would do.
fn tally(
    job: &Job,
    renderer: &Renderer,
    backend: &crate::backend::Backend,
    planner: &mut Planner,
    limit: Option<u64>,
    schema_tokens: u64,
) -> Result<Tally, Error> {
    let keying = crate::plan::keying(job);
    let builder = Builder::new(job, backend);
    let batched = job.mode == Mode::Batch;
    let mut splitter = crate::exec::batch::Splitter::new(job.batch.clone());
    let mut line = Vec::new();
    let mut t = Tally::default();
    let shared = crate::backend::shared_messages(job);
    for item in builder.rendered(job, renderer, limit)? {
        t.rows += 1;
        let p = match item {
            Rendered::Ready(p) => p,
            Rendered::Unreadable(number) => {
                t.bad += u64::from(crate::plan::owns_unreadable(job, number));
                continue;
            }
        };
        if !crate::plan::owns(job, &p) {
            continue;
        }
        let n = backend.counter.count_prompt(&p.request.messages) + schema_tokens;
        if t.prefix.is_none() && shared > 0 {
            let k = shared.min(p.request.messages.len());
            t.prefix = Some((k, backend.counter.count_prompt(&p.request.messages[..k])));
        }
        t.prompt += n;
        for img in p.request.messages.iter().flat_map(|m| m.content.images()) {
            let it = crate::tokens::image_tokens(&job.served.model, img);
            t.images.count += 1;
            t.images.tokens += it.tokens;
            t.images.assumed += u64::from(it.assumed);
        }
        match planner.plan(&p)? {
            Decision::Send => {
                t.to_send += 1;
                t.prompt_todo += n;
                if batched {
                    let idh = keying.id_hash(&p.row.id);
                    crate::exec::batch::vendor::dry_line(job, &mut line, &p, idh);
                    let len = line.len() as u64;
                    if splitter.check(len).is_err() {
                        t.too_big += 1;
                    } else {
                        splitter.add(len);
                    }
                }
            }
            Decision::Copy => t.copies += 1,
            Decision::Done | Decision::DoneFailed | Decision::WriteError => t.done += 1,
        }
    }
    t.files = splitter.files;
    Ok(t)
}

/// What the rows are: read, done, copied, to send, and their prompt tokens.
fn print_rows(job: &Job, t: &Tally, schema_tokens: u64, estimated: bool) {
    let batched = job.mode == Mode::Batch;
    println!("job               {}", job.file.display());
    println!(
        "model             {}{}",
        job.served.model,
        if batched {
            " (Batch API: batch prices)"
        } else {
            ""
        }
    );
    println!(
        "rows              {} ({} unreadable or unrenderable)",
        t.rows, t.bad
    );
    println!("already done      {}", t.done);
    println!(
        "same request      {} (copied from another row, not sent)",
        t.copies
    );
    println!("rows to send      {}", t.to_send);
    println!(
        "prompt tokens     {} (to send: {}){}",
        t.prompt,
        t.prompt_todo,
        if estimated {
            format!(
                "\n  estimated         the model's tokenizer is not public: OpenAI's o200k \
                 counts × {}, which can be off by about a fifth either way; the bound and \
                 the budget use these (over-)counts",
                match job.served.provider {
                    crate::job::ProviderKind::Gemini => crate::tokens::GEMINI_MARGIN,
                    _ => crate::tokens::CLAUDE_MARGIN,
                }
            )
        } else {
            String::new()
        }
    );
    if schema_tokens > 0 {
        println!(
            "  of which schema  {schema_tokens} per row (its JSON text, counted with the model's \
             tokenizer: OpenAI bills the schema as prompt tokens but does not publish exactly \
             how, so this is an estimate)"
        );
    }
    if t.images.count > 0 {
        println!(
            "images            {} ({} prompt tokens of the above, by {}{})",
            t.images.count,
            t.images.tokens,
            if job.served.provider == crate::job::ProviderKind::Gemini {
                "Gemini's rule, 258 a tile"
            } else {
                "OpenAI's tile rule"
            },
            if t.images.assumed > 0 {
                format!(
                    "; {} https URLs not fetched, assumed {}×{} at high detail",
                    t.images.assumed,
                    crate::tokens::ASSUMED_IMAGE_SIZE.0,
                    crate::tokens::ASSUMED_IMAGE_SIZE.1
                )
            } else {
                String::new()
            }
        );
    }
}

/// What sending them would cost: the bound, the expectation, and batch mode's files.
fn print_cost(
    job: &Job,
    t: &Tally,
    price: Option<crate::cost::Price>,
    mean_completion: Option<f64>,
) {
    let max_out = job.params.max_output_tokens();
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
    // Claude has no `n`: each choice is a request, and pays the prompt again.
    let prompts = if job.served.provider == crate::job::ProviderKind::Anthropic {
        t.prompt_todo * job.params.choices()
    } else {
        t.prompt_todo
    };
    let bound = price.map(|p| p.bound(prompts, out_cap * t.to_send));
    let expected = price
        .map(|p| (prompts as f64 * p.input + expected_out * t.to_send as f64 * p.output) / 1e6);
    println!(
        "max output tokens {}{}",
        out_cap * t.to_send,
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
    if job.mode == Mode::Batch {
        println!(
            "batch files       {} (at most {} requests and {} bytes each; one batch per file)",
            t.files.len(),
            job.batch.max_requests_per_file,
            job.batch.max_bytes_per_file
        );
        for (i, (n, b)) in t.files.iter().enumerate() {
            println!("  file {:<4}       {n} requests, {b} bytes", i + 1);
        }
        if t.too_big > 0 {
            println!(
                "too large         {} requests are over the file size limit alone",
                t.too_big
            );
        }
    }
}

/// The prefix every row shares, and what the provider's prompt cache should save on it at list
/// prices: the first row writes it (Claude: at the write rate), every other row to send reads it.
fn print_cache(job: &Job, t: &Tally, price: Option<crate::cost::Price>) {
    use crate::job::ProviderKind;
    let Some((k, prefix)) = t.prefix else {
        println!("shared prefix     none (the first message reads the row)");
        return;
    };
    println!("shared prefix     {prefix} tokens (the first {k} messages, the same for every row)");
    let min = match job.served.provider {
        ProviderKind::Anthropic if job.served.prompt_cache == PromptCache::Off => {
            println!("prompt cache      off ([model] prompt_cache = \"off\")");
            return;
        }
        ProviderKind::Anthropic => min_cached_tokens(&job.served.model),
        // OpenAI caches prompts of 1,024 tokens and more by itself.
        ProviderKind::Openai => 1024,
        // Gemini's implicit cache: 1,024 tokens on Flash, 4,096 on Pro; not guaranteed.
        ProviderKind::Gemini if job.served.model.contains("pro") => 4096,
        ProviderKind::Gemini => 1024,
        ProviderKind::Local => return,
    };
    if prefix < min {
        println!("prompt cache      nothing cached: the prefix is under the {min} tokens the model caches");
        return;
    }
    let (Some(p), Some(reads)) = (price, t.to_send.checked_sub(1)) else {
        return;
    };
    // The job's prefix tokens as usage: one write (OpenAI's is priced as input), a read for
    // every other row; the saving is what the record of such usage would say.
    let hour = job.served.prompt_cache == PromptCache::OneHour;
    let usage = crate::chat::Usage {
        prompt_tokens: prefix * t.to_send,
        cached_tokens: Some(prefix * reads),
        cache_write_tokens: Some(prefix),
        cache_write_1h_tokens: hour.then_some(prefix),
        ..Default::default()
    };
    let saved = p.cache_saving(&usage);
    if job.served.provider == ProviderKind::Gemini {
        // Gemini's implicit cache hits when it happens to; nothing asks for it.
        println!(
            "prompt cache      may save up to ${saved:.6} at list prices (Gemini's implicit \
             cache is not guaranteed; the bound and the budget count none of it)"
        );
        return;
    }
    println!(
        "prompt cache      should save ${saved:.6} at list prices (1 write, {reads} reads of the prefix)"
    );
}
