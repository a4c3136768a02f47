//! A streamed answer's lines (server-sent events), as every HTTP provider reads them: each
//! line is handed over as it completes, whatever the chunks the body arrives in.

use futures::StreamExt;

use super::ProviderError;

/// Hands each line of the body (with its line ending) to `each` until `each` says the stream
/// is done (`true`). `Ok(false)`: the body ended first. `cut`: the provider's reading of a
/// body that broke off (its transport error, the key scrubbed).
pub(crate) async fn lines(
    resp: reqwest::Response,
    cut: impl Fn(reqwest::Error) -> ProviderError,
    mut each: impl FnMut(&[u8]) -> Result<bool, ProviderError>,
) -> Result<bool, ProviderError> {
    let mut pending: Vec<u8> = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(&cut)?;
        pending.extend_from_slice(&chunk);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            if each(&line)? {
                return Ok(true);
            }
        }
    }
    Ok(!pending.is_empty() && each(&pending)?)
}
