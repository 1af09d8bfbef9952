//! What a request is aimed at: scheme, host, port and canonical path, read from the request
//! target (plain proxy) or from the tunnel it arrived in — never chosen by a header.
//!
//! SECURITY: the destination decides (SPEC §4.2). For absolute-form requests the URI authority is
//! the destination and `Host` must agree; inside a tunnel the CONNECT authority is the destination
//! and `Host`/`:authority` must name it. Every disagreement or odd spelling is refused.

use http::header::HOST;
use http::request::Parts;
use http::{HeaderMap, Method, Version};

use crate::decide::normalize_host;
use crate::matcher::canon::{canonicalize, Ambiguity, CanonPath};
use crate::policy::Scheme;
use crate::proxy::forward::spelt_as;
use crate::proxy::fragment::FragmentInTarget;
use crate::reason::Reason;

/// Where a request goes, as decided from its target.
#[derive(Debug)]
pub struct Target {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub path: CanonPath,
}

/// Why a target cannot be decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetError {
    pub reason: Reason,
    /// closed-set detail for ambiguous requests
    pub code: &'static str,
}

fn ambiguous(code: &'static str) -> TargetError {
    TargetError {
        reason: Reason::AmbiguousRequest,
        code,
    }
}

fn mismatch() -> TargetError {
    TargetError {
        reason: Reason::HostMismatch,
        code: "host_mismatch",
    }
}

/// The tunnel a request arrived through.
#[derive(Clone, Debug)]
pub struct TunnelHost {
    pub host: String,
    pub port: u16,
}

/// Headers that ask a server (or the gateway in front of it) to read the request as another
/// than its request line says, with the detail code each is refused with (SPEC §4.4 "method-
/// override headers and kin"):
/// - another method;
/// - another path: Symfony and Zend's `X-Original-URL`/`X-Rewrite-URL` (CVE-2018-14773), IIS
///   URL Rewrite, nginx and Envoy's forwarded-path headers;
/// - another host: gateways and frameworks that trust forwarded-host headers route (or build
///   links) by them, so a credentialed request could reach another virtual host or tenant
///   than the one decided on (SPEC §4.2: the destination decides, never a header).
const OVERRIDES: [(&str, &str); 20] = [
    ("x-http-method-override", "method_override"),
    ("x-http-method", "method_override"),
    ("x-method-override", "method_override"),
    ("x-original-method", "method_override"),
    ("x-forwarded-method", "method_override"),
    ("x-original-url", "path_override"),
    ("x-rewrite-url", "path_override"),
    ("x-original-uri", "path_override"),
    ("x-override-url", "path_override"),
    ("x-forwarded-uri", "path_override"),
    ("x-forwarded-path", "path_override"),
    ("x-forwarded-prefix", "path_override"),
    ("x-envoy-original-path", "path_override"),
    ("x-forwarded-host", "host_override"),
    ("x-forwarded-server", "host_override"),
    ("x-host", "host_override"),
    ("x-original-host", "host_override"),
    ("x-http-host-override", "host_override"),
    ("x-original-forwarded-host", "host_override"),
    ("x-forwarded-hostname", "host_override"),
];

/// The request head's size as HTTP/1 sends it (request line and header lines with their
/// CRLFs), which `proxy.max_header_bytes` bounds. The parser's own limit is a buffer size, not
/// this, so keyward checks it itself; HTTP/2 heads count the same way.
pub fn head_len(method: &Method, uri: &http::Uri, headers: &HeaderMap) -> usize {
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = method.as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    headers
        .iter()
        .fold(line + 2, |n, (k, v)| n + k.as_str().len() + 2 + v.len() + 2)
}

/// Target of an absolute-form request on the plain listener.
pub fn absolute_target(parts: &Parts) -> Result<Target, TargetError> {
    let uri = &parts.uri;
    let authority = uri.authority().ok_or(ambiguous("not_absolute_form"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        // `host:port` with a method other than CONNECT (`connect`, lower case, is another
        // method): not a scheme keyward refuses, no absolute URI at all.
        None => return Err(ambiguous("not_absolute_form")),
        Some(_) => return Err(ambiguous("unsupported_scheme")),
    };
    let (host, port) = parse_authority(authority.as_str(), scheme.default_port())?;
    // SECURITY: Host must agree with the URI, or some hop could route by the other one.
    if let Some(h) = single_host_header(&parts.headers)? {
        let (hh, hp) = parse_authority(h, scheme.default_port())?;
        if hh != host || hp != port {
            return Err(ambiguous("host_disagrees_with_uri"));
        }
    }
    common_checks(parts)?;
    let path = canon_path(parts)?;
    Ok(Target {
        scheme,
        host,
        port,
        path,
    })
}

/// Target of a request inside an intercepted tunnel to `tunnel`.
pub fn tunnel_target(parts: &Parts, tunnel: &TunnelHost) -> Result<Target, TargetError> {
    // HTTP/2's `:authority` and an HTTP/1.1 absolute-form target (RFC 9112 §3.2.2: a server
    // must accept it) both land in the URI. Whatever names the host — the URI's authority,
    // the `Host` header, or both, which must then agree — must name the tunnel's, over https.
    // A CONNECT's authority-form target lands in the URI too: a nested tunnel, never a host.
    if parts.method == Method::CONNECT {
        return Err(ambiguous("nested_connect"));
    }
    let host_header = single_host_header(&parts.headers)?;
    let named = match (parts.uri.authority().map(|a| a.as_str()), host_header) {
        (Some(authority), Some(h)) if !h.eq_ignore_ascii_case(authority) => {
            return Err(ambiguous("authority_disagrees_with_host"));
        }
        (Some(authority), _) => authority,
        // RFC 9113 §8.3.1 lets an HTTP/2 request carry `host` instead of `:authority`, but the
        // HTTP/2 layer then drops `:scheme` too (a URI cannot be a scheme and a path): a
        // request whose scheme cannot be checked is refused.
        (None, _) if parts.version == Version::HTTP_2 => {
            return Err(ambiguous("missing_authority"))
        }
        (None, Some(h)) => h,
        (None, None) => return Err(ambiguous("missing_host")),
    };
    if parts.uri.scheme_str().is_some_and(|s| s != "https") {
        return Err(ambiguous("unsupported_scheme"));
    }
    // A Host without a port names https's port, 443 (RFC 9110 §4.2.2), as on the plain
    // listener: in a tunnel to another port it names another authority, and is refused like
    // an explicit `:443` would be. (Clients write a port that is not the default.)
    let (host, port) = parse_authority(named, 443)?;
    if host != tunnel.host || port != tunnel.port {
        return Err(mismatch());
    }
    common_checks(parts)?;
    let path = canon_path(parts)?;
    Ok(Target {
        scheme: Scheme::Https,
        host: tunnel.host.clone(),
        port: tunnel.port,
        path,
    })
}

fn common_checks(parts: &Parts) -> Result<(), TargetError> {
    // The parser cut the fragment off; the connection's sniffer saw it (see `fragment`).
    if parts.extensions.get::<FragmentInTarget>().is_some() {
        return Err(ambiguous(Ambiguity::Fragment.as_str()));
    }
    if parts.method == Method::CONNECT {
        return Err(ambiguous("nested_connect"));
    }
    if let Some(code) = parts.headers.keys().find_map(|k| override_code(k.as_str())) {
        return Err(ambiguous(code));
    }
    if let Some(code) = parts
        .headers
        .keys()
        .find_map(|k| lookalike_code(k.as_str()))
    {
        return Err(ambiguous(code));
    }
    if !plain_chunked(&parts.headers) {
        return Err(ambiguous("transfer_coding"));
    }
    // RFC 9113 §8.2.1: an HTTP/2 field value that starts or ends with a blank is malformed.
    // HTTP/1 parsers (an upstream's) trim it, so the upstream would read another value than
    // keyward did.
    if parts.version == Version::HTTP_2
        && parts.headers.values().any(|v| {
            let v = v.as_bytes();
            let blank = |b: &u8| matches!(b, b' ' | b'\t');
            v.first().is_some_and(blank) || v.last().is_some_and(blank)
        })
    {
        return Err(ambiguous("field_value_blank"));
    }
    // `Forwarded` (RFC 7239) is fine for `for=` and `by=`, which a proxy in front may add;
    // its `host=` is a host override.
    if parts
        .headers
        .get_all(http::header::FORWARDED)
        .iter()
        .any(|v| names_host(v.as_bytes()))
    {
        return Err(ambiguous("host_override"));
    }
    // SECURITY: Laravel, Symfony and Express's method-override read `_method` from the query
    // string too: `POST /x?_method=DELETE` is a DELETE there.
    if parts.uri.query().is_some_and(has_method_param) {
        return Err(ambiguous("method_override"));
    }
    Ok(())
}

/// Whether a query string has a parameter a framework may read as `_method` (Laravel and
/// Symfony through PHP, Express's method-override): the name percent-decoded (`+` as a space),
/// then as PHP renames request variables — cut at a NUL, leading spaces dropped, ` ` and `.`
/// read as `_`, and a `[` either ending the name (`_method[]`) or, unclosed, read as `_`
/// (`[method`) — compared without case. `&` or `;` separates pairs.
fn has_method_param(query: &str) -> bool {
    query.split(['&', ';']).any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let decoded = crate::credentials::decode_query_name(key.as_bytes());
        let name = decoded.split(|&b| b == 0).next().unwrap_or_default();
        let start = name.iter().position(|&b| b != b' ').unwrap_or(name.len());
        let name = &name[start..];
        let cut = name.iter().position(|&b| b == b'[').unwrap_or(name.len());
        is_method_name(name[..cut].iter().copied())
            || is_method_name(
                name.iter()
                    .enumerate()
                    .map(|(i, &b)| if i == cut { b'_' } else { b }),
            )
    })
}

/// Whether a query has a parameter that some server reads as `param` although query
/// injection (which replaces `param` itself, also percent-encoded) leaves it in place: another
/// case (`API_KEY`), a PHP spelling (`api.key`, `+api_key`, `api_key[]`, `api[key`), a pair
/// after `;`, which some servers split on (`a=1;api_key=x`), or a pair that only decoding
/// makes (`x=%26api_key%3Dy`, for servers that decode the query before splitting it). Such a
/// server could see two values. A raw `?` splits like `;`: some servers look for `?api_key=`
/// anywhere in the URL (Hono's `query()`), so `x=?api_key=y` or `??api_key=y` would be read
/// first.
pub fn query_lookalike(query: &str, param: &str) -> bool {
    let want = php_names(param.as_bytes());
    let reads_as_param = |decoded_key: &[u8]| {
        let decoded = unicode_folded(decoded_key);
        let root = structural_root(&decoded);
        want.contains(&root) || php_names(&decoded).iter().any(|n| want.contains(n))
    };
    query.split('&').any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let replaced = key == param
            || crate::credentials::decode_query_name(key.as_bytes()).as_ref() == param.as_bytes();
        let lookalike = !replaced
            && pair.split([';', '?']).any(|sub| {
                let key = sub.split_once('=').map_or(sub, |(k, _)| k);
                reads_as_param(&crate::credentials::decode_query_name(key.as_bytes()))
            });
        // Pairs that appear once `%26`, `%3B`, `%3F` or `%3D` are decoded: injection replaces
        // none of them (but the pair it replaces itself), so `param` itself counts.
        let made_by_decoding = || {
            crate::credentials::decode_query_name(pair.as_bytes())
                .split(|&b| matches!(b, b'&' | b';' | b'?'))
                .enumerate()
                .any(|(i, made)| {
                    let key = made.split(|&b| b == b'=').next().unwrap_or_default();
                    (i > 0 || !replaced) && reads_as_param(key)
                })
        };
        lookalike || (pair.contains('%') && made_by_decoding())
    })
}

/// A decoded name as servers beyond ASCII may read it: blanks at either end dropped in
/// Unicode's sense (JavaScript's `trim`, Python's `strip`: `\x0b`, `\xa0`, `\u3000`, the
/// byte-order mark, …), and
/// each character case-folded to ASCII where it folds to ASCII (Java's `equalsIgnoreCase`
/// matches the dotless `ı` with `i`, the Kelvin sign with `k`).
fn unicode_folded(name: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let odd_blank = |b: &u8| matches!(b, 0x0b | 0x0c | 0x1c..=0x1f);
    if name.is_ascii()
        && !name.first().is_some_and(odd_blank)
        && !name.last().is_some_and(odd_blank)
    {
        return name.into();
    }
    let text = String::from_utf8_lossy(name);
    let blank = |c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c) || c == '\u{feff}';
    let mut out = Vec::with_capacity(name.len());
    for c in text.trim_matches(blank).chars() {
        // `İ` lowercases to `i` and a combining dot, which Java's comparison ignores.
        let folded: String = c
            .to_uppercase()
            .flat_map(char::to_lowercase)
            .filter(|c| !('\u{300}'..='\u{36f}').contains(c))
            .collect();
        let c = if folded.is_ascii() {
            folded
        } else {
            c.to_string()
        };
        out.extend_from_slice(c.as_bytes());
    }
    out.into()
}

/// The name a nesting parser keys a parameter under, lowercased: `[api_key]` (qs, Rack),
/// `api_key.x` (qs with `allowDots`), `api_key]`, trailing or leading blanks dropped.
fn structural_root(name: &[u8]) -> Vec<u8> {
    let start = name
        .iter()
        .position(|&b| !matches!(b, b'[' | b' ' | b'\t'))
        .unwrap_or(name.len());
    let name = name.get(start..).unwrap_or_default();
    let end = name
        .iter()
        .position(|&b| matches!(b, b'[' | b']' | b'.' | 0))
        .unwrap_or(name.len());
    let name = name.get(..end).unwrap_or_default();
    let name = name.trim_ascii_end();
    name.to_ascii_lowercase()
}

/// The names PHP may turn a decoded parameter name into, lowercased: cut at a NUL, leading
/// spaces dropped, ` ` and `.` read as `_`, and a `[` either ending the name (`a[]`) or read
/// as `_` (an unclosed `a[b`).
fn php_names(name: &[u8]) -> [Vec<u8>; 2] {
    let name = name.split(|&b| b == 0).next().unwrap_or_default();
    let start = name.iter().position(|&b| b != b' ').unwrap_or(name.len());
    let name = name.get(start..).unwrap_or_default();
    let fold = |b: u8| match b {
        b' ' | b'.' => b'_',
        b => b.to_ascii_lowercase(),
    };
    let cut = name.iter().position(|&b| b == b'[').unwrap_or(name.len());
    let ended: Vec<u8> = name.iter().take(cut).map(|&b| fold(b)).collect();
    let underscored: Vec<u8> = name
        .iter()
        .enumerate()
        .map(|(i, &b)| if i == cut { b'_' } else { fold(b) })
        .collect();
    [ended, underscored]
}

/// `_method` without case, reading ` ` and `.` as `_`.
fn is_method_name(name: impl Iterator<Item = u8>) -> bool {
    let mut want = b"_method".iter();
    for b in name {
        let b = if b == b' ' || b == b'.' { b'_' } else { b };
        if !want.next().is_some_and(|w| w.eq_ignore_ascii_case(&b)) {
            return false;
        }
    }
    want.next().is_none()
}

/// The detail code of the override header `name` spells, in any case and also with `_` or
/// another separator for `-` (`forward::spelt_as`). SECURITY: CGI-style stacks (PHP, WSGI)
/// map `_` and `-` in header names to the same variable, so `X_HTTP_Method_Override` is
/// honoured as the override it spells.
fn override_code(name: &str) -> Option<&'static str> {
    // Every override name starts with `x-`/`x_`: most headers are out after one byte.
    if !name.starts_with(['x', 'X']) {
        return None;
    }
    OVERRIDES
        .iter()
        .find_map(|&(o, code)| spelt_as(name, o).then_some(code))
}

/// The detail code for a header that is one keyward reads or removes, spelled with `_` (or
/// another separator) for `-`, which a server that reads `_` as `-` (CGI-style, as some do for every header) takes
/// for the real one. SECURITY:
/// - `Content-Length`, `Transfer-Encoding`: that server frames the body by it, keyward and
///   the parser do not; the body would be read two ways, and what the upstream takes for the
///   rest of it (or the next request) would be the task's next credentialed request;
/// - `Sec-WebSocket-Extensions`: keyward removes it from a credentialed upgrade, so that no
///   compression hides a message from the redactor.
fn lookalike_code(name: &str) -> Option<&'static str> {
    const SPECIAL: [(&str, &str); 3] = [
        ("content-length", "framing_lookalike"),
        ("transfer-encoding", "framing_lookalike"),
        ("sec-websocket-extensions", "header_lookalike"),
    ];
    // Most names are out by their length alone.
    let separated = |name: &str| {
        name.bytes()
            .any(|b| b != b'-' && !b.is_ascii_alphanumeric())
    };
    if !SPECIAL.iter().any(|(real, _)| real.len() == name.len()) || !separated(name) {
        return None;
    }
    SPECIAL
        .iter()
        .find_map(|&(real, code)| spelt_as(name, real).then_some(code))
}

/// Whether the request's transfer coding, if any, is `chunked` alone. With another coding
/// (`gzip, chunked`) the parser takes the chunks off and `Transfer-Encoding` is hop-by-hop, so
/// the upstream would get gzip bytes as a plain body: read two ways, refused (RFC 9112 §6.1
/// lets a server refuse a coding it does not forward).
fn plain_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => true,
        Some(only) => only.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Whether a `Forwarded` value has a `host` parameter (`for=a;host=b, for=c`).
fn names_host(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',' || b == b';')
        .filter_map(|pair| pair.split(|&b| b == b'=').next())
        .any(|key| key.trim_ascii().eq_ignore_ascii_case(b"host"))
}

fn canon_path(parts: &Parts) -> Result<CanonPath, TargetError> {
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    canonicalize(target).map_err(|a| ambiguous(a.as_str()))
}

/// The check a CONNECT's head must pass: a CONNECT has no content (RFC 9110 §9.3.6), so
/// framing on one would be read two ways (the first bytes of the tunnel, or a body). Its
/// `Host` is not checked: the destination is the authority alone (SPEC §4.2), and common
/// clients send the proxy's own name there (Node's `http.request` does).
pub fn connect_head(headers: &HeaderMap) -> Result<(), TargetError> {
    let has_content = headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|n| n.trim().parse::<u64>().ok()) != Some(0));
    if has_content {
        return Err(ambiguous("connect_with_body"));
    }
    Ok(())
}

fn single_host_header(headers: &HeaderMap) -> Result<Option<&str>, TargetError> {
    let mut all = headers.get_all(HOST).iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(ambiguous("duplicate_host"));
    }
    first.to_str().map(Some).map_err(|_| ambiguous("bad_host"))
}

/// Splits and normalizes `host[:port]`. Refuses userinfo, empty or odd ports (`:0443`, `:+443`,
/// `:0`, over 65535) and anything that is not a plain host name or IP literal.
pub fn parse_authority(authority: &str, default_port: u16) -> Result<(String, u16), TargetError> {
    if authority.contains('@') {
        return Err(ambiguous("userinfo"));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']').ok_or(ambiguous("bad_authority"))?;
        let host = &authority[..end + 2];
        let after = &rest[end + 1..];
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(ambiguous("bad_authority")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => parse_port(p).ok_or(ambiguous("bad_port"))?,
    };
    let host = normalize_host(host).ok_or(ambiguous("bad_host"))?;
    Ok((host, port))
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || p.starts_with('0') || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_field_values_with_blanks_at_either_end_are_refused() {
        let tunnel = TunnelHost {
            host: "secure.test".into(),
            port: 443,
        };
        let target = |version: Version, value: &'static str| {
            let (parts, ()) = http::Request::get("https://secure.test/x")
                .version(version)
                .header("x-a", value)
                .body(())
                .unwrap()
                .into_parts();
            tunnel_target(&parts, &tunnel)
                .map(|_| ())
                .map_err(|e| e.code)
        };
        for value in [" lead", "trail ", "\ttab", "x\t"] {
            assert_eq!(
                target(Version::HTTP_2, value),
                Err("field_value_blank"),
                "{value:?}"
            );
            // HTTP/1's parser trimmed them already: what keyward sees is what is sent.
            assert_eq!(target(Version::HTTP_11, value), Ok(()), "{value:?}");
        }
        assert_eq!(target(Version::HTTP_2, "in between"), Ok(()));
    }

    #[test]
    fn query_lookalikes_of_the_injected_parameter_are_found() {
        for q in [
            "API_KEY=x",
            "api.key=x",
            "+api_key=x",
            "api_key[]=x",
            "api[key=x",
            "a=1;api_key=x",
            "q=1&Api_Key=x",
            "%20api_key=x",
            "api_key%00junk=x",
            "[api_key]=x",
            "%5Bapi_key%5D=x",
            "api_key]=x",
            "api_key%20=x",
            "api_key+=x",
            "api_key%09=x",
            "api_key.x=y",
            // Blanks beyond ASCII's at either end, and characters that case-fold to ASCII.
            "api_key%0b=x",
            "%0bapi_key=x",
            "api_key%1f=x",
            "api_key%c2%a0=x",
            "%c2%a0api_key=x",
            "api_key%c2%85=x",
            "api_key%e3%80%80=x",
            "ap%C4%B1_key=x",
            "api_%E2%84%AAey=x",
            "API%u005FKEY=x",
            "%u00a0api_key=x",
            "ap%C4%B0_key=x",
            "ap%u0130_key=x",
            "%EF%BB%BFapi_key=x",
            "%uFEFFapi_key=x",
            // Read first by servers that look for `?api_key=` in the raw URL.
            "x=?api_key=mine",
            "?api_key=mine",
            "x=1?API_KEY=mine",
            // Pairs that decoding makes, for servers that decode before they split.
            "x=%26api_key%3Dmine",
            "x=1%3Bapi_key=mine",
            "x%26api_key=mine",
            "x=%3Fapi_key=mine",
            "x=%26API.KEY=mine",
            "x=%u0026api_key=mine",
            // A name that decodes to the pair itself.
            "api_key%3Dmine",
            "api_key%3Dmine=z",
        ] {
            assert!(query_lookalike(q, "api_key"), "{q}");
        }
        // What injection replaces itself, and unrelated names, are not lookalikes.
        for q in [
            "api_key=x",
            "api%5Fkey=x",
            "%61pi_key=x",
            "api%u005Fkey=x",
            "%u0061pi_key=x",
            "q=1&api_key=x;api_key=y",
            "api_keys=x",
            "key=x&api=y",
            "x=%26other%3Dy",
            "x=a%20b&y=%2F",
            // A `?` inside a value that names nothing like it.
            "redirect=https://x.example/?a=b",
            "q=1&x=a?b",
            "",
        ] {
            assert!(!query_lookalike(q, "api_key"), "{q}");
        }
    }

    fn is_method_override_name(name: &str) -> bool {
        override_code(name) == Some("method_override")
    }

    #[test]
    fn host_overrides_are_found_and_forwarded_only_with_a_host() {
        for name in [
            "x-forwarded-host",
            "X_Forwarded_Host",
            "x-host",
            "x-forwarded-server",
        ] {
            assert_eq!(override_code(name), Some("host_override"), "{name}");
        }
        for name in ["x-forwarded-for", "x-forwarded-proto", "host", "x-hosts"] {
            assert_eq!(override_code(name), None, "{name}");
        }
        for v in [
            "host=evil.test",
            "for=1.2.3.4;Host=\"b\"",
            "for=a, for=b; host = c",
        ] {
            assert!(names_host(v.as_bytes()), "{v}");
        }
        for v in [
            "for=1.2.3.4",
            "for=a;by=b;proto=https",
            "for=\"host=x\"",
            "",
        ] {
            assert!(!names_host(v.as_bytes()), "{v}");
        }
    }

    #[test]
    fn method_overrides_are_found_in_dash_and_underscore_spellings() {
        for name in [
            "x-http-method-override",
            "x_http_method_override",
            "x-http_method-override",
            "x_method_override",
            "x-http-method",
            "x_http_method",
            "x.http.method",
            "X.HTTP~Method",
        ] {
            assert!(is_method_override_name(name), "{name}");
        }
        assert!(is_method_override_name(
            "X_Forwarded_Method".to_ascii_lowercase().as_str()
        ));
        assert!(is_method_override_name("x-original-method"));
        for name in [
            "x-http-method-overrides",
            "x-method",
            "x-http-methods",
            "method",
        ] {
            assert!(!is_method_override_name(name), "{name}");
        }
    }

    #[test]
    fn method_parameters_are_found_in_every_spelling() {
        for q in [
            "_method=DELETE",
            "a=1&_method=put",
            "_METHOD=PATCH",
            "%5Fmethod=DELETE",
            "%5fmethod",
            "_%6Dethod=DELETE",
            "a=1;_method=DELETE",
            // PHP's renaming of request variables.
            ".method=DELETE",
            "+_method=DELETE",
            "%20%20_method=DELETE",
            "[method=DELETE",
            "_method[]=DELETE",
            "_method[x]=DELETE",
            "_method%00x=DELETE",
        ] {
            assert!(has_method_param(q), "{q}");
        }
        for q in [
            "",
            "method=DELETE",
            "my_method=1",
            "_methods=1",
            "x=_method",
            "%5",
            "__method=1",
            "x[_method]=1",
            "=_method",
            "_meth",
            // Leading spaces are dropped, not read as `_`.
            " method=DELETE",
            // Broken spellings are names like any other.
            "%",
            "%%5F",
            "[",
            "+",
            "%00",
            "&&;;==",
        ] {
            assert!(!has_method_param(q), "{q}");
        }
    }

    #[test]
    fn authority_forms() {
        assert_eq!(
            parse_authority("API.GitHub.com.:443", 443).unwrap(),
            ("api.github.com".to_string(), 443)
        );
        assert_eq!(
            parse_authority("[::1]:8443", 443).unwrap(),
            ("::1".to_string(), 8443)
        );
        assert_eq!(
            parse_authority("example.com", 80).unwrap(),
            ("example.com".to_string(), 80)
        );
        for bad in [
            "host:443@evil:443",
            "user@host",
            "host:0443",
            "host:+443",
            "host:0",
            "host:99999",
            "host:",
            "ho st:443",
            ":443",
            "[::1",
            "[::1]x",
            "a..b:443",
        ] {
            assert!(parse_authority(bad, 443).is_err(), "{bad} must be refused");
        }
    }
}
