//! Which vendor's batch API a job's batches go to: the one place that knows every vendor file.

use super::api::BatchApi;
use crate::error::Error;
use crate::job::{Job, ProviderKind};

/// The job's batch API, by its provider: OpenAI (and Azure OpenAI), Anthropic, Gemini.
pub fn for_job(job: &Job) -> Result<Box<dyn BatchApi>, Error> {
    Ok(match job.served.provider {
        ProviderKind::Anthropic => Box::new(super::anthropic::AnthropicBatches::for_job(job)?),
        ProviderKind::Gemini => Box::new(super::gemini::GeminiBatches::for_job(job)?),
        // The local model runs online only (the job refuses batch mode for it).
        ProviderKind::Openai | ProviderKind::Local => {
            Box::new(super::openai::OpenAiBatches::for_job(job)?)
        }
    })
}

/// A row's batch line as the job's vendor spells it, with no client (no key needed): what the
/// dry run sizes parts with. OpenAI's is the line `export` writes (an Azure line names its
/// deployment instead of the model: a few bytes apart).
pub fn dry_line(job: &Job, out: &mut Vec<u8>, p: &crate::request::Prepared, idh: u64) {
    let stream = job.params.stream.unwrap_or(false);
    match job.served.provider {
        ProviderKind::Anthropic => {
            let id = super::results::compact_custom_id(p.row.number, &p.fingerprint, idh);
            super::anthropic::write_line(out, &id, &p.request.body, stream);
        }
        ProviderKind::Gemini => {
            let id = super::results::custom_id(p.row.number, &p.fingerprint, idh);
            super::gemini::write_line(out, &id, &p.request.body);
        }
        ProviderKind::Openai | ProviderKind::Local => super::write_openai_line(out, p, idh, stream),
    }
}
