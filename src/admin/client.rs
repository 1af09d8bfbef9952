//! The CLI's client of the admin API (`keyward task mint|list|revoke`).

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not a valid admin URL (expected e.g. http://127.0.0.1:8481)")]
    BadUrl(String),
    #[error("cannot reach the admin API at {0}; is `keyward serve` running?")]
    Unreachable(String),
    #[error("the admin API answered {status}: {body}")]
    Refused { status: StatusCode, body: String },
}

/// Sends one request with the admin token and returns the JSON body of a 2xx answer.
pub async fn call(
    admin: &str,
    token: &Secret,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let base = admin.trim_end_matches('/');
    let uri: http::Uri = format!("{base}{path}")
        .parse()
        .map_err(|_| ClientError::BadUrl(admin.to_string()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(ClientError::BadUrl(admin.to_string()));
    }
    let payload = body
        .map(|b| Bytes::from(serde_json::to_vec(&b).unwrap_or_default()))
        .unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(payload))
        .map_err(|_| ClientError::BadUrl(admin.to_string()))?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(req)
        .await
        .map_err(|_| ClientError::Unreachable(admin.to_string()))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| ClientError::Unreachable(admin.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err(ClientError::Refused {
            status,
            body: String::from_utf8_lossy(&bytes).trim().to_string(),
        });
    }
    Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}
