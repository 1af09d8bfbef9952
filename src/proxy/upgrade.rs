//! WebSocket upgrades: the only upgrade keyward relays (never `h2c` or others), decided like
//! any request, and relayed only after the upstream really answered `101 Switching Protocols`.
//! Frames are relayed opaquely once both sides have switched.

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, Method, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::proxy::record::Recorder;

/// Whether the agent asks for a WebSocket upgrade in the one form that is relayed:
/// HTTP/1.1 `GET` with `Upgrade: websocket` and `Connection: upgrade`.
pub fn wants_websocket(parts: &Parts) -> bool {
    parts.method == Method::GET
        && parts.version == Version::HTTP_11
        && single_token(&parts.headers, UPGRADE)
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn single_token(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    first.to_str().ok().map(str::trim)
}

/// Puts back the two hop-by-hop headers an upgrade needs (after every other one was removed).
pub fn mark_upgrade(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
}

/// Relays bytes between the agent and the upstream once both upgrades complete, then finishes
/// the request's audit record with the byte counts.
pub async fn relay(agent: OnUpgrade, upstream: OnUpgrade, recorder: Recorder) {
    let (agent, upstream) = match tokio::join!(agent, upstream) {
        (Ok(a), Ok(u)) => (a, u),
        _ => return recorder.complete(0, "upgrade_failed", 0),
    };
    let mut agent = TokioIo::new(agent);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut agent, &mut upstream).await {
        Ok((_up, down)) => recorder.complete(down, "completed", 0),
        Err(_) => recorder.complete(0, "reset", 0),
    }
}
