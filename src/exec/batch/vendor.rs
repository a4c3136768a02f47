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

/// A row's input line as the job's vendor would upload it, without a client (no key needed):
/// what the dry run sizes files with.
pub fn write_line_for(
    job: &Job,
    out: &mut Vec<u8>,
    p: &crate::request::Prepared,
    idh: u64,
    stream: bool,
) {
    if job.served.provider == ProviderKind::Gemini {
        let id = super::results::custom_id(p.row.number, &p.fingerprint, idh);
        super::gemini::write_line(out, &id, &p.request.body);
    } else {
        super::openai::write_openai_line(out, p, idh, stream);
    }
}
