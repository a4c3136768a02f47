//! Which vendor's batch API a job's batches go to: the one place that knows every vendor file.

use super::api::BatchApi;
use crate::error::Error;
use crate::job::Job;

/// The job's batch API, by its provider (OpenAI and Azure OpenAI today).
pub fn for_job(job: &Job) -> Result<Box<dyn BatchApi>, Error> {
    Ok(Box::new(super::openai::OpenAiBatches::for_job(job)?))
}
