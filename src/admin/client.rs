//! The CLI's client of the admin API (`keyward task mint|list|revoke`).

use std::time::Duration;

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
    #[error("KEYWARD_ADMIN_TOKEN cannot be sent in a header (it has a control character)")]
    BadToken,
    #[error("the admin API at {0} did not answer within {1} s")]
    TimedOut(String, u64),
    #[error("the admin API answered {status}: {body}")]
    Refused { status: StatusCode, body: String },
}

/// Sends one request with the admin token and returns the JSON body of a 2xx answer, if it
/// comes within `timeout` (an admin listener whose places are all held must not hang the
/// operator's `task revoke` without a word).
pub async fn call(
    admin: &str,
    timeout: Duration,
    token: &Secret,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    tokio::time::timeout(timeout, exchange(admin, token, method, path, body))
        .await
        .unwrap_or_else(|_| Err(ClientError::TimedOut(admin.to_string(), timeout.as_secs())))
}

async fn exchange(
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
    let mut auth = http::HeaderValue::try_from(format!("Bearer {}", token.expose()))
        .map_err(|_| ClientError::BadToken)?;
    auth.set_sensitive(true);
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::AUTHORIZATION, auth)
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
            body: summary(&bytes),
        });
    }
    Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

/// An error body on one line: the admin API's `message` (or its list of `errors`), else the
/// text with its whitespace collapsed.
fn summary(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if let Some(m) = json["message"].as_str() {
        return m.to_string();
    }
    if let Some(errors) = json["errors"].as_array() {
        let list: Vec<&str> = errors.iter().filter_map(|e| e.as_str()).collect();
        return list.join("; ");
    }
    String::from_utf8_lossy(body)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
