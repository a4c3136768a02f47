//! `render` and `validate`: a row's messages as they would go out, and the job checked whole.

use std::path::Path;

use crate::cli::JobArgs;
use crate::error::{Error, EXIT_OK, EXIT_STOPPED};
use crate::job::{Job, Overrides, ProviderKind};
use crate::provider::endpoint::is_loopback;
use crate::render::Renderer;
use crate::request::Builder;

use super::job_overrides;

pub(super) fn render(args: &JobArgs, row: u64) -> Result<i32, Error> {
    let job = Job::load(&args.job, &job_overrides(args)?)?;
    let renderer = Renderer::new(&job)?;
    let backend = crate::backend::Backend::for_job(&job, false)?;
    let builder = Builder::new(&job, &backend);
    let source = crate::input::Source::of(&job);
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
        println!(
            "--- fingerprint {}",
            crate::fingerprint::hex(&p.fingerprint)
        );
        return Ok(EXIT_OK);
    }
    Err(Error::Input {
        path: job.input.clone(),
        message: format!("there is no row {row}"),
    })
}

/// A message's content as `render` shows it: the text, then one line per image (a data URL
/// by its type and size, not its base64).
pub(super) fn print_content(content: &crate::chat::Content) {
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
pub(super) fn validate(path: &Path, input: Option<std::path::PathBuf>) -> Result<i32, Error> {
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
    let source = crate::input::Source::of(&job);
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
        for (field, message) in r.message_fields() {
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
    if job.served.provider != ProviderKind::Local
        && std::env::var(&job.served.api_key_env).is_err()
        && !is_loopback(&job.served.base_url)
    {
        problems.push(format!(
            "{}: the API key variable {} is not set (environment or .env)",
            path.display(),
            job.served.api_key_env
        ));
    }
    if job.served.provider == ProviderKind::Local {
        if let Ok(p) = crate::backend::local_model_path(&job) {
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
