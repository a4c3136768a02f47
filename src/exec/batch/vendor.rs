//! Which vendor's batch API a job's batches go to: the one place that knows every vendor file.

use super::api::BatchApi;
use crate::error::Error;
use crate::job::{Job, ProviderKind};

/// The job's batch API, by its provider: OpenAI (and Azure OpenAI), Anthropic.
pub fn for_job(job: &Job) -> Result<Box<dyn BatchApi>, Error> {
    Ok(match job.served.provider {
        ProviderKind::Anthropic => Box::new(super::anthropic::AnthropicBatches::for_job(job)?),
        // The local model runs online only (the job refuses batch mode for it).
        ProviderKind::Openai | ProviderKind::Local => {
            Box::new(super::openai::OpenAiBatches::for_job(job)?)
        }
    })
}
