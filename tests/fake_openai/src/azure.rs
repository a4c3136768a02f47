//! Azure OpenAI's chat route, `POST /openai/deployments/{deployment}/chat/completions`: the
//! `api-version` query and the `api-key` header are checked the way Azure does, then the
//! request is answered by the OpenAI chat handler with the deployment as the model.

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::Shared;

/// What an Azure request carried, for tests to check the client's URL and auth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureHit {
    pub deployment: String,
    /// The `api-version` query parameter, if any.
    pub api_version: Option<String>,
    /// The `api-key` header, if any.
    pub api_key: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// The deployment a request was addressed to; the chat handler answers with it as the model,
/// as Azure answers with the deployment's model rather than the body's `model`.
#[derive(Clone)]
pub(crate) struct Deployment(pub String);

/// `Some(deployment)` for Azure's chat completions path.
pub(crate) fn chat_deployment(path: &str) -> Option<&str> {
    let d = path
        .strip_prefix("/openai/deployments/")?
        .strip_suffix("/chat/completions")?;
    (!d.is_empty() && !d.contains('/')).then_some(d)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

/// Azure's error shape: `{"error": {"code", "message"}}`, with no `type`.
fn azure_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = json!({"error": {"code": code, "message": message}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Azure's answer when the request's `api-version` is not the configured one (missing or
/// unknown), for every route under `/openai/`: the batch routes call this too.
pub(crate) fn api_version_error(shared: &Shared, query: Option<&str>) -> Option<Response<Body>> {
    let want = shared.config.azure_api_version.as_ref()?;
    (query_param(query, "api-version").as_ref() != Some(want))
        .then(|| azure_error(StatusCode::NOT_FOUND, "404", "Resource not found"))
}

/// Azure's 401 when `require_key` is set and the request carries it neither in `api-key` nor
/// as a bearer token (Azure's Microsoft Entra ID auth); None when it may pass.
pub(crate) fn key_error(shared: &Shared, headers: &header::HeaderMap) -> Option<Response<Body>> {
    let key = shared.config.require_key.as_deref()?;
    let get = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let api_key = get(header::HeaderName::from_static("api-key"));
    let bearer = get(header::AUTHORIZATION).and_then(|a| a.strip_prefix("Bearer "));
    (api_key != Some(key) && bearer != Some(key)).then(|| {
        azure_error(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
             provide a valid key for an active subscription and use a correct regional API \
             endpoint for your resource.",
        )
    })
}

pub(crate) async fn chat(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    let deployment = chat_deployment(req.uri().path())
        .unwrap_or_default()
        .to_string();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let hit = AzureHit {
        deployment: deployment.clone(),
        api_version: query_param(req.uri().query(), "api-version"),
        api_key: header("api-key"),
        authorization: header("authorization"),
    };
    shared.azure_hits.lock().unwrap().push(hit.clone());

    if let Some(r) = api_version_error(shared, req.uri().query()) {
        return r;
    }
    if let Some(r) = key_error(shared, req.headers()) {
        return r;
    }
    if let Some(key) = shared.config.require_key.as_deref() {
        // Checked above: the OpenAI handler behind takes it as a valid bearer key.
        let v = HeaderValue::from_str(&format!("Bearer {key}")).expect("a header-safe key");
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    req.extensions_mut().insert(Deployment(deployment));
    crate::handler::chat(shared, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployment_is_read_from_the_path() {
        assert_eq!(
            chat_deployment("/openai/deployments/mini-prod/chat/completions"),
            Some("mini-prod")
        );
        assert_eq!(
            chat_deployment("/openai/deployments//chat/completions"),
            None
        );
        assert_eq!(chat_deployment("/v1/chat/completions"), None);
        assert_eq!(
            query_param(Some("a=1&api-version=2024-10-21"), "api-version").as_deref(),
            Some("2024-10-21")
        );
        assert_eq!(query_param(None, "api-version"), None);
    }
}
