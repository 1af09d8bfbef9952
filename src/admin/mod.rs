//! The admin listener (SPEC §5): tasks, reload, metrics, health. Every `/v1/` route needs
//! `Authorization: Bearer <admin token>`, compared in constant time. Never imports `proxy`.

pub mod client;
mod routes;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::places::{self, Strangers};
use crate::state::State;

pub type AdminResponse = Response<Full<Bytes>>;

/// Accepts admin connections until shutdown, then lets open ones finish (bounded).
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let strangers = Arc::new(Strangers::default());
    accept(listener, &state, &limit, &strangers).await;
    crate::proxy::conn::drain(&state, &limit, MAX_ADMIN_CONNECTIONS).await;
}

async fn accept(
    listener: TcpListener,
    state: &Arc<State>,
    limit: &Arc<Semaphore>,
    strangers: &Arc<Strangers>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = state.stopped() => return,
        };
        let Ok((stream, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // SECURITY (I7): with every place taken, the oldest connection that has not sent the
        // admin token makes room (`places`): probes and scrapers keep theirs while there is
        // room, but clients without the token cannot keep the operator out (of revoking a
        // task, say) by holding every place with `GET /healthz`.
        let permit = tokio::select! {
            p = places::place_for(limit, strangers) => match p { Some(p) => p, None => return },
            () = state.stopped() => return,
        };
        let stranger = Arc::new(strangers.arrive());
        // A connection to a loopback address comes from this machine, and only a web page
        // rebound to it (DNS rebinding) would name another host.
        // (`::ffff:127.0.0.1` on a dual-stack `[::]` listener is loopback too.)
        let loopback = stream
            .local_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback());
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let settings = &state.settings;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_read_timeout)
                .max_buf_size(settings.parser_head_limit());
            let svc_state = state.clone();
            let known = stranger.clone();
            let svc = service_fn(move |req| {
                let state = svc_state.clone();
                let known = known.clone();
                async move {
                    // The proxy's head limit, counted as the proxy counts it (hyper's own is a
                    // read buffer's size, which a head may pass before it is refused).
                    let head =
                        crate::proxy::identify::head_len(req.method(), req.uri(), req.headers());
                    if head > state.settings.max_header_bytes {
                        return Ok::<_, Infallible>(error(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "head_too_large",
                            "the request line and headers are larger than proxy.max_header_bytes",
                        ));
                    }
                    if loopback && !names_loopback(&req) {
                        return Ok::<_, Infallible>(foreign_host());
                    }
                    if authorized(&state, &req) {
                        known.known();
                    }
                    Ok(route(&state, req).await)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stranger.crowded_out() => return,
                () = state.stopped() => {}
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn => {}
                () = state.drain_ended() => {}
            }
        });
    }
}

/// Concurrent admin connections; more wait in the listen backlog. Operators and scrapers need
/// few, and the proxy listener's limit must not be reachable through this one.
const MAX_ADMIN_CONNECTIONS: usize = 256;

async fn route(state: &Arc<State>, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method.as_str(), path.as_str()) {
        // Liveness fails only for what a restart mends: an audit log that failed a write
        // stays failed (no record, no request), so the process would refuse forever.
        ("GET" | "HEAD", "/healthz") if !state.audit.healthy() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit log failed; keyward takes no request until it is restarted\n",
        ),
        ("GET" | "HEAD", "/healthz") => text(StatusCode::OK, "ok\n"),
        ("GET" | "HEAD", "/readyz") => routes::readyz(state),
        ("GET" | "HEAD", "/metrics") => routes::metrics(state),
        (_, "/healthz" | "/readyz" | "/metrics") => routes::method_not_allowed("GET or HEAD"),
        (_, p) if p == "/v1" || p.starts_with("/v1/") => {
            if !authorized(state, &req) {
                let mut resp = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send Authorization: Bearer <admin token>",
                );
                resp.headers_mut().insert(
                    "www-authenticate",
                    HeaderValue::from_static("Bearer realm=\"keyward-admin\""),
                );
                return resp;
            }
            routes::v1(state, req).await
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// Whether a request that reached a loopback address names a loopback host (or none).
/// SECURITY: a page an agent's browser loads can have its name resolve to 127.0.0.1 (DNS
/// rebinding) and read `/metrics` and `/readyz` (agent, service and credential names) as its
/// own origin; its requests still name the page's host. `*.localhost` never leaves the
/// machine (RFC 6761). Scrapers reaching a pod address are not concerned.
/// The authority of an absolute-form target counts as well as `Host` (both must be loopback).
fn names_loopback<B>(req: &Request<B>) -> bool {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => Some(h.as_bytes()),
        (Some(_), Some(_)) => return false,
    };
    let host_ok = host.map_or(true, |h| {
        std::str::from_utf8(h).is_ok_and(is_loopback_authority)
    });
    host_ok
        && req
            .uri()
            .authority()
            .map_or(true, |a| is_loopback_authority(a.as_str()))
}

/// Whether `host` (`name[:port]`, `[ip6][:port]`) names this machine.
fn is_loopback_authority(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => (ip, ""),
            Some((ip, port)) => match port.strip_prefix(':') {
                Some(port) => (ip, port),
                None => return false,
            },
            None => return false,
        },
        None => host.split_once(':').unwrap_or((host, "")),
    };
    // The port must be a port (or empty, as RFC 3986 allows): `127.0.0.1:80@evil.example`
    // names no loopback host, whatever its start says.
    let is_port = |p: &str| {
        p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    };
    if !port.is_empty() && !is_port(port) {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    // `0.0.0.0` and `[::]` reach this machine only (a person typing the wildcard address).
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| {
            let ip = ip.to_canonical();
            ip.is_loopback() || ip.is_unspecified()
        })
}

fn foreign_host() -> AdminResponse {
    error(
        StatusCode::MISDIRECTED_REQUEST,
        "host_not_loopback",
        "this connection reached a loopback address: name it as localhost or by a loopback address",
    )
}

fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    let mut values = req.headers().get_all(http::header::AUTHORIZATION).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some(token) = v
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
    else {
        return false;
    };
    // SECURITY: constant-time comparison of the admin token.
    state.is_admin_token(token.as_bytes())
}

/// An error answer: `error` and `reason` both hold the code (SPEC §5 says "with a reason";
/// `error` is what the API always had), `message` says it in words.
pub fn error(status: StatusCode, code: &str, message: &str) -> AdminResponse {
    json(
        status,
        &serde_json::json!({"error": code, "reason": code, "message": message}),
    )
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> AdminResponse {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_hosts(hosts: &[&str]) -> Request<()> {
        let mut req = Request::new(());
        for h in hosts {
            req.headers_mut()
                .append(http::header::HOST, HeaderValue::from_str(h).unwrap());
        }
        req
    }

    #[test]
    fn only_loopback_names_pass_the_rebinding_guard() {
        for ok in [
            "127.0.0.1:8481",
            "127.0.0.1",
            "127.1.2.3:80",
            "localhost:8481",
            "LOCALHOST",
            "localhost.",
            "metrics.localhost:9",
            "[::1]:8481",
            "[::1]",
            "[::ffff:127.0.0.1]:8481",
            "0.0.0.0:8481",
            "[::]:8481",
            "localhost:",
        ] {
            assert!(names_loopback(&with_hosts(&[ok])), "{ok}");
        }
        assert!(names_loopback(&with_hosts(&[])), "no Host at all");
        for bad in [
            "attacker.example:8481",
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.1.nip.io:8481",
            "10.0.0.5:8481",
            "[::ffff:10.0.0.1]:8481",
            "[::1]x",
            "[::1",
            "",
            "127.0.0.1:evil.example",
            "localhost:x.evil.example",
            "127.0.0.1:80@evil.example",
            "[::1]:x@evil.example",
            "localhost:99999999",
            "localhost:0",
            "localhost:+80",
            "localhost:80:80",
            "::1",
        ] {
            assert!(!names_loopback(&with_hosts(&[bad])), "{bad}");
        }
        assert!(!names_loopback(&with_hosts(&["localhost", "evil.example"])));
    }

    #[test]
    fn an_absolute_target_must_name_loopback_too() {
        let absolute = |target: &str, host: Option<&str>| {
            let mut req = Request::get(target).body(()).unwrap();
            if let Some(h) = host {
                req.headers_mut()
                    .insert(http::header::HOST, HeaderValue::from_str(h).unwrap());
            }
            names_loopback(&req)
        };
        assert!(!absolute("http://evil.example/metrics", Some("127.0.0.1")));
        assert!(!absolute("http://evil.example/metrics", None));
        assert!(!absolute("http://127.0.0.1/metrics", Some("evil.example")));
        assert!(absolute(
            "http://localhost:8481/metrics",
            Some("127.0.0.1:8481")
        ));
        assert!(absolute("/metrics", Some("[::1]:8481")));
    }
}
