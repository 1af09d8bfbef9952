//! The only module that talks to upstreams: sends an injected request through its service's
//! connection pool and classifies what went wrong. Never follows redirects (the agent sees 3xx).

use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme as UriScheme};
use http::{HeaderMap, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::policy::Scheme;
use crate::proxy::identify::Target;
use crate::upstream::{ConnectError, SendError, UpBody, Upstreams};

/// An upstream that failed; not a decision.
#[derive(Debug)]
pub enum UpstreamError {
    /// the connector refused the resolved address (a decision after all: `blocked_address`)
    Blocked,
    /// connect, DNS or TLS failure, or the connection broke: 502. `kind` is the metric label,
    /// `why` the error and its causes, for keyward's log (never for the agent).
    Failed { kind: &'static str, why: String },
    /// no response head in time: 504
    Timeout,
}

/// Removes hop-by-hop headers and every header named in `Connection` (SPEC §4.6), and says
/// whether a `TE` among them accepted trailers (see `accepts_trailers`).
/// SECURITY: called before injection, so `Connection: authorization` cannot strip the credential.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // One look at the names present, then a removal per name found: most requests carry only
    // `Proxy-Authorization`, and nine blind removals (a hash and a probe each) cost more.
    let mut doomed: smallvec::SmallVec<[HeaderName; 4]> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    if headers.contains_key(http::header::CONNECTION) {
        doomed.extend(
            headers
                .get_all(http::header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
        );
    }
    // Looked at only when there is a `TE` (rare outside gRPC): its value goes with it.
    let trailers = doomed.contains(&http::header::TE) && accepts_trailers(headers);
    for name in doomed {
        headers.remove(name);
    }
    trailers
}

/// RFC 9110 §8.6: a `Content-Length` sent more than once with one value (HTTP/2 lets that
/// through), or with leading zeros, goes on as one canonical value, so no upstream parser can
/// read another length than keyward's HTTP layer did. False for values that disagree or are
/// not a plain decimal number (refused as ambiguous).
pub fn canonical_content_length(headers: &mut HeaderMap) -> bool {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return true;
    };
    let decimal = |v: &http::HeaderValue| {
        let b = v.as_bytes();
        if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(b).ok()?.parse::<u64>().ok()
    };
    let Some(len) = decimal(first) else {
        return false;
    };
    let mut canonical = first.len() == 1 || first.as_bytes().first() != Some(&b'0');
    for other in values {
        if decimal(other) != Some(len) {
            return false;
        }
        canonical = false;
    }
    if !canonical {
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    true
}

/// Whether the agent's `TE` says it takes trailers. `TE` is hop-by-hop, so it is removed with
/// the rest; what keyward itself accepts from the upstream is `trailers` (it relays them),
/// said again when the agent asked for them: gRPC servers refuse a request without it.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|coding| {
            let name = coding.split(|&b| b == b';').next().unwrap_or_default();
            name.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
}

/// A status without a registered reason phrase, answered over HTTP/1.1 with none of the
/// upstream's (a credentialed answer's phrase is dropped): hyper would write `<none>`; the
/// class's name is written instead.
pub fn name_unknown_status<B>(resp: &mut http::Response<B>) {
    let status = resp.status();
    if status.canonical_reason().is_some()
        || resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .is_some()
    {
        return;
    }
    let class: &'static [u8] = match status.as_u16() / 100 {
        1 => b"Informational",
        2 => b"Success",
        3 => b"Redirection",
        4 => b"Client Error",
        5 => b"Server Error",
        _ => b"Unknown",
    };
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(class));
}

/// Drops what would let the agent act with the injected credential's authority without
/// keyward: a session an upstream opens for it (`Set-Cookie`, `Set-Cookie2`) is a bearer
/// secret that outlives the task, its revocation and its intent, and that no redaction finds
/// (it is not the credential's value). Called on answers to requests that carried one.
pub fn strip_session_grants(headers: &mut HeaderMap) {
    // One look at the names first: most answers carry neither, and a blind removal is a hash
    // and a probe each.
    if headers
        .keys()
        .any(|name| name == http::header::SET_COOKIE || name == SET_COOKIE2)
    {
        headers.remove(http::header::SET_COOKIE);
        headers.remove(&SET_COOKIE2);
    }
}

static SET_COOKIE2: HeaderName = HeaderName::from_static("set-cookie2");

/// Whether the header name `name` is the lowercase `want` in any case, or `want` with some `-` written as
/// another character that is not a letter or digit (`_`, `.`, `~`, ...): CGI stacks
/// (`HTTP_IF_RANGE`) and servers that copy them read `_` as `-`, and some (lighttpd's CGI and
/// FastCGI) turn every such character into `_`.
pub fn spelt_as(name: &str, want: &str) -> bool {
    let separator = |b: u8| !b.is_ascii_alphanumeric();
    name.len() == want.len()
        && name
            .bytes()
            .zip(want.bytes())
            .all(|(b, w)| b.to_ascii_lowercase() == w || (separator(b) && separator(w)))
}

/// Removes `Range`, `If-Range` and `Request-Range` (the pre-RFC 2616 spelling Apache httpd
/// still honours when `Range` is absent), also written with `_` for `-`, which CGI stacks read
/// alike (`HTTP_IF_RANGE`).
pub fn strip_ranges(headers: &mut HeaderMap) {
    let is_range = |name: &HeaderName| {
        ["range", "if-range", "request-range"]
            .iter()
            .any(|want| spelt_as(name.as_str(), want))
    };
    // One look at the names; a removal only for what is there.
    let doomed: smallvec::SmallVec<[HeaderName; 2]> =
        headers.keys().filter(|n| is_range(n)).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Parsed once: removing by `&str` would parse each name again on every request.
/// `Expect` is not hop-by-hop by name, but keyward answers `100-continue` to the agent itself
/// and streams the body at once: passed on, it asks an upstream to answer before the body
/// (a `417`, then reading the body as the connection's next request).
///
/// `HTTP2-Settings` is not listed: an h2c upgrade names it in `Connection` (RFC 7540 §3.2.1),
/// which removes it, and a stray one is inert; each name here costs every request a compare
/// per header (an eleventh cost about 600 instructions per request under callgrind).
static HOP_BY_HOP: [HeaderName; 10] = [
    http::header::CONNECTION,
    http::header::EXPECT,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Whether a response body may reach the agent as other bytes than its content: content-coded
/// with anything but `identity`, or transfer-coded with anything but `chunked` alone (so its
/// bytes are not the bytes the redactor would need to see).
///
/// SECURITY (I4): `chunked` must be the only transfer coding, not merely one of them. With
/// `chunked, identity` (or two headers saying so) the body is read to the connection's close
/// with its chunk framing left in: a credential split over two chunks reaches the agent as
/// two halves with a chunk-size line between them, which it can strip.
pub fn is_encoded(headers: &HeaderMap) -> bool {
    let codings = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
    };
    let content_coded =
        codings(http::header::CONTENT_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"identity"));
    let mut transfer = codings(http::header::TRANSFER_ENCODING);
    let transfer_coded = match (transfer.next(), transfer.next()) {
        (None, _) => false,
        (Some(only), None) => !only.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => true,
    };
    content_coded || transfer_coded
}

/// A response's `Content-Length`, when it has exactly one that is a number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut all = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let only = all.next()?;
    if all.next().is_some() {
        return None;
    }
    only.to_str().ok()?.trim().parse().ok()
}

/// Points the request at the target's authority in absolute form; the client writes the
/// origin-form line and `Host` (HTTP/1.1) or `:authority` (HTTP/2) from it.
pub fn aim(req: &mut Request<UpBody>, target: &Target) -> Option<()> {
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    let authority = if target.port == target.scheme.default_port() {
        Authority::try_from(host).ok()?
    } else {
        Authority::try_from(format!("{host}:{}", target.port)).ok()?
    };
    let scheme = match target.scheme {
        Scheme::Http => UriScheme::HTTP,
        Scheme::Https => UriScheme::HTTPS,
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts).ok()?;
    req.headers_mut().remove(http::header::HOST);
    // The upstream connection's protocol is chosen by ALPN, not by the agent's.
    *req.version_mut() = Version::HTTP_11;
    Some(())
}

/// Sends the request and waits (bounded) for the response head; the body streams afterwards.
pub async fn send(
    upstreams: &Upstreams,
    service: usize,
    task: u64,
    req: Request<UpBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, UpstreamError> {
    let pool = req
        .uri()
        .host()
        .and_then(|host| upstreams.pool(service, host))
        .ok_or_else(|| UpstreamError::Failed {
            kind: "connect",
            why: "the request names no host".into(),
        })?;
    match tokio::time::timeout(timeout, pool.send(req, task)).await {
        Err(_) => Err(UpstreamError::Timeout),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(SendError::Connect(ConnectError::Blocked))) => Err(UpstreamError::Blocked),
        Ok(Err(SendError::Connect(ConnectError::Timeout))) => Err(UpstreamError::Timeout),
        Ok(Err(SendError::Connect(e))) => Err(UpstreamError::Failed {
            kind: e.kind(),
            why: causes(&e),
        }),
        Ok(Err(SendError::Protocol(e))) => Err(UpstreamError::Failed {
            kind: "protocol",
            why: causes(&e),
        }),
    }
}

/// An error and its sources, `: `-joined (`the upstream TLS handshake failed: invalid peer
/// certificate: UnknownIssuer`).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_goes_on_once_as_a_plain_decimal_or_is_refused() {
        let canon = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from_str(v).unwrap(),
                );
            }
            canonical_content_length(&mut h).then(|| {
                h.get_all(http::header::CONTENT_LENGTH)
                    .iter()
                    .map(|v| v.to_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(canon(&[]), Some(vec![]));
        for (sent, sends) in [
            (&["3"][..], "3"),
            (&["0"], "0"),
            (&["00"], "0"),
            (&["007"], "7"),
            (&["3", "3"], "3"),
            (&["3", "03"], "3"),
            (&["18446744073709551615"], "18446744073709551615"),
        ] {
            assert_eq!(canon(sent), Some(vec![sends.to_string()]), "{sent:?}");
        }
        for refused in [
            &["3", "4"][..],
            &["+3"],
            &["-3"],
            &["3, 3"],
            &[" 3"],
            &["0x3"],
            &[""],
            &["18446744073709551616"],
            &["3", "x"],
        ] {
            assert_eq!(canon(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn ranges_go_in_every_spelling() {
        let mut h = HeaderMap::new();
        for name in [
            "range",
            "if-range",
            "request-range",
            "request_range",
            "if_range",
            "range-unit",
            "x-range",
        ] {
            h.insert(name, "bytes=0-3".parse().unwrap());
        }
        strip_ranges(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["range-unit", "x-range"]);
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, X-Trace"),
            ("connection", "upgrade"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-trace", "1"),
            ("x-trace", "2"),
            ("accept", "*/*"),
            ("authorization", "Bearer agent"),
        ] {
            h.append(n, http::HeaderValue::from_static(v));
        }
        assert!(strip_hop_by_hop(&mut h), "its TE took trailers");
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "authorization"]);
    }

    #[test]
    fn codings_other_than_identity_and_chunked_are_encoded() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, http::HeaderValue::from_static(v));
            }
            is_encoded(&h)
        };
        assert!(!with(&[]));
        assert!(!with(&[("content-encoding", "identity")]));
        assert!(!with(&[("transfer-encoding", "chunked")]));
        assert!(!with(&[("content-encoding", "")]));
        assert!(with(&[("content-encoding", "gzip")]));
        assert!(with(&[
            ("content-encoding", "identity"),
            ("content-encoding", "br")
        ]));
        assert!(with(&[("transfer-encoding", "gzip, chunked")]));
        assert!(with(&[("content-encoding", "IDENTITY, deflate")]));
        // `chunked` must be the only transfer coding (else the body is read to the close with
        // its chunk lines in it).
        assert!(!with(&[("transfer-encoding", "Chunked")]));
        assert!(with(&[("transfer-encoding", "chunked, identity")]));
        assert!(with(&[("transfer-encoding", "identity")]));
        assert!(with(&[("transfer-encoding", "chunked, chunked")]));
        assert!(with(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "identity")
        ]));
    }
}
