//! Which vendor's batch API a job's batches go to: the one place that knows every vendor file.

use super::api::BatchApi;
use crate::error::Error;
use crate::job::{Job, ProviderKind};

/// The job's batch API, by its provider: Gemini's, or OpenAI's (Azure OpenAI's too).
pub fn for_job(job: &Job) -> Result<Box<dyn BatchApi>, Error> {
    if job.served.provider == ProviderKind::Gemini {
        return Ok(Box::new(super::gemini::GeminiBatches::for_job(job)?));
    }
    Ok(Box::new(super::openai::OpenAiBatches::for_job(job)?))
}
