//! Parsers for the policy's structured scalars: host patterns, `connect_to` authorities,
//! names, header-value templates. Pure string → value functions whose errors are sentences that
//! never repeat the input (the caller adds position and key path).
//!
//! Must never do I/O or name resolution: a host is checked for shape only.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::model::HostPattern;

const MAX_NAME_LEN: usize = 128;

/// A duration as policies and mint requests write it (`30s`, `5m`, `1h 30m`, `500ms`, `2d`):
/// humantime's, less its calendar units. Its `M` is months, so a `30M` meant as minutes would
/// be 30 months; and a month or a year is an average, not a length.
pub(crate) fn parse_duration(text: &str) -> Result<std::time::Duration, &'static str> {
    let calendar = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .any(|unit| matches!(unit, "M" | "month" | "months" | "y" | "year" | "years"));
    if calendar {
        return Err("months and years are not durations here (`M` is months, not minutes): use d, h, m, s or ms");
    }
    humantime::parse_duration(text).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => "is too long a duration",
        _ => "must be a duration with a unit, like `30s`, `5m` or `1h`",
    })
}

/// Names of credentials, services, capabilities and agents end up in audit records, metric
/// labels and intents, so they are kept to a plain character set.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    let ok_rest = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_first || !ok_rest || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "names must start with a letter or digit and use only letters, digits, `.`, `_` and `-` (at most {MAX_NAME_LEN})"
        ));
    }
    Ok(())
}

/// Well-known prefixes of API keys and tokens.
const PREFIXES: &[&str] = &[
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "sk-",
    "sk_",
    "rk_",
    "xox",
    "AKIA",
    "ASIA",
    "AIza",
    "hf_",
    "npm_",
    "pypi-",
    "eyJ",
];

/// Whether a string written where a name belongs looks like a token instead (well-known key
/// prefixes, or long with many digits), or is no name at all, so that messages do not repeat
/// it.
pub(crate) fn looks_like_secret(text: &str) -> bool {
    check_name(text).is_err() || looks_pasted(text)
}

/// A name or key that reads like a pasted credential: a known key prefix, or long with
/// digits in it. Never repeated in an error or warning (`Errors::push` hides it).
pub(crate) fn looks_pasted(text: &str) -> bool {
    let digits = text.bytes().filter(u8::is_ascii_digit).count();
    PREFIXES.iter().any(|p| text.starts_with(p)) || (text.len() >= 24 && digits >= 4)
}

/// `text` (a source's file path, variable or command, as the policy wrote it) with each part
/// between `/`, blanks and backticks that looks like a pasted credential written `(hidden)`.
/// SECURITY: `file:sk-live-…` is a secret pasted after `file:`, not a path; messages about
/// the source (it cannot be read, say) go to logs, `/readyz` and `check`.
pub(crate) fn hide_pasted_parts(text: &str) -> std::borrow::Cow<'_, str> {
    let is_sep = |c: char| c == '/' || c == '`' || c.is_whitespace();
    if !text.split(is_sep).any(looks_pasted) {
        // `/` is a base64 character: such a secret's parts are short, and look like nothing.
        return match looks_like_base64_secret(text.trim_start_matches("./")) {
            true => std::borrow::Cow::Borrowed("(hidden)"),
            false => std::borrow::Cow::Borrowed(text),
        };
    }
    let mut shown = String::with_capacity(text.len());
    let mut part = String::new();
    for c in text.chars().chain(std::iter::once('/')) {
        if is_sep(c) {
            shown.push_str(if looks_pasted(&part) {
                "(hidden)"
            } else {
                &part
            });
            shown.push(c);
            part.clear();
        } else {
            part.push(c);
        }
    }
    shown.pop();
    std::borrow::Cow::Owned(shown)
}

/// Base64 of random bytes, as an AWS secret access key is: long, only base64 characters, and
/// mixed case with digits, as paths seldom are.
fn looks_like_base64_secret(text: &str) -> bool {
    let count = |f: fn(&u8) -> bool| text.bytes().filter(f).count();
    text.len() >= 24
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'=' | b'-' | b'_'))
        && count(u8::is_ascii_uppercase) >= 4
        && count(u8::is_ascii_lowercase) >= 4
        && count(u8::is_ascii_digit) >= 1
}

/// `api.github.com`, `*.example.com`, `127.0.0.1`, `::1`, `[::1]`.
pub(crate) fn parse_host_pattern(text: &str) -> Result<HostPattern, String> {
    if let Some(base) = text.strip_prefix("*.") {
        if base.contains('*') {
            return Err(
                "`*` may appear only once, as the whole first label (`*.example.com`)".into(),
            );
        }
        let base = parse_host(base)?;
        if base.parse::<Ipv4Addr>().is_ok() || base.contains(':') {
            return Err("a wildcard must cover a DNS name, not an IP address".into());
        }
        // SECURITY: `*.com` would hand one service's credential to a whole top-level domain.
        if !base.contains('.') {
            return Err(
                "a wildcard must cover a name with at least two labels (`*.example.com`)".into(),
            );
        }
        return Ok(HostPattern::Wildcard(base));
    }
    if text.contains('*') {
        return Err("`*` may appear only as the whole first label (`*.example.com`)".into());
    }
    let host = parse_host(text)?;
    // An IPv4-mapped IPv6 address is the IPv4 address under a second spelling: two services
    // (or a service and a passthrough entry) could name one address, and the overlap checks,
    // which compare names, would not see it. (`connect_to` may dial one.)
    if let Some(v4) = host
        .parse::<Ipv6Addr>()
        .ok()
        .and_then(|ip| ip.to_ipv4_mapped())
    {
        return Err(format!(
            "an IPv4-mapped IPv6 address; write the IPv4 address (`{v4}`)"
        ));
    }
    Ok(HostPattern::Exact(host))
}

/// A single host (no wildcard), normalized: lowercase, no trailing dot, IPv6 without brackets.
pub(crate) fn parse_host(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("a host must not be empty".into());
    }
    if text.contains('/') || text.contains('?') || text.contains('#') {
        return Err(
            "a host must not contain a scheme or a path; write the bare name (`api.example.com`)"
                .into(),
        );
    }
    if text.contains('@') {
        return Err("a host must not contain userinfo (`user@`)".into());
    }
    if text.contains('%') {
        return Err(
            "a host must not contain `%` (an IPv6 zone id, or percent-encoding); write the bare name or address"
                .into(),
        );
    }
    if let Some(inner) = text.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err("a host must not include a port (a service's port is its `port:`; a passthrough host is tunnelled on any port)".into());
        };
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| ip.to_string())
            .map_err(|_| "not a valid IPv6 address".into());
    }
    if text.contains(':') {
        return match text.parse::<Ipv6Addr>() {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => Err("a host must not include a port (a service's port is its `port:`; a passthrough host is tunnelled on any port)".into()),
        };
    }
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(ip.to_string());
    }
    if name.len() > 253 {
        return Err("a host name may be at most 253 characters".into());
    }
    let mut labels = name.split('.').peekable();
    while let Some(label) = labels.next() {
        if label.is_empty() {
            return Err("a host name must not have empty labels (`..`, leading `.`)".into());
        }
        if label.len() > 63 {
            return Err("a host name's labels may be at most 63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(
                "a host name may use only letters, digits, `-` and `_` (write IDNs as `xn--`)"
                    .into(),
            );
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a host name's labels must not start or end with `-`".into());
        }
        // SECURITY: `1.2.3` or `0x7f.1` are read as IPv4 addresses by some resolvers; a name
        // must not be an address in disguise.
        if labels.peek().is_none() && label.bytes().all(|b| b.is_ascii_digit()) {
            return Err(
                "a host name must not end in an all-numeric label (it reads as an IP address)"
                    .into(),
            );
        }
    }
    Ok(name)
}

/// `connect_to: HOST:PORT` (`127.0.0.1:9443`, `[::1]:9443`, `backend.internal:443`).
pub(crate) fn parse_authority(text: &str) -> Result<(String, u16), String> {
    const USAGE: &str = "must be `HOST:PORT`, like `127.0.0.1:9443` or `[::1]:9443`";
    if text.contains("://") {
        return Err(format!("{USAGE}, without a scheme"));
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inner, port) = rest.split_once("]:").ok_or(USAGE)?;
        (format!("[{inner}]"), port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or(USAGE)?;
        if host.contains(':') {
            return Err("an IPv6 address must be in brackets: `[::1]:9443`".into());
        }
        (host.to_owned(), port)
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or("the port must be a number from 1 to 65535")?;
    Ok((parse_host(&host)?, port))
}

/// A header value template split around its one `${credential}`.
pub(crate) fn split_template(template: &str) -> Result<(String, String), String> {
    const PLACEHOLDER: &str = "${credential}";
    let Some((prefix, suffix)) = template.split_once(PLACEHOLDER) else {
        return Err("`value` must contain `${credential}` where the secret goes".into());
    };
    if suffix.contains(PLACEHOLDER) {
        return Err("`value` must contain `${credential}` exactly once".into());
    }
    if prefix.contains("${") || suffix.contains("${") {
        return Err("`value` may contain no placeholder other than `${credential}`".into());
    }
    // The rest is sent verbatim as part of a header value: visible ASCII, space and tab only.
    let valid = |s: &str| s.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
    if !valid(prefix) || !valid(suffix) {
        return Err("`value` may contain only visible ASCII characters, spaces and tabs".into());
    }
    Ok((prefix.to_owned(), suffix.to_owned()))
}

/// Headers keyward may not write: hop-by-hop ones are stripped before forwarding, and the
/// framing ones (`Host`, `Content-Length`, `Transfer-Encoding`) decide where and how much.
pub(crate) fn check_inject_header(name: &str) -> Result<http::HeaderName, String> {
    let header = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| "not a valid HTTP header name".to_string())?;
    const FORBIDDEN: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ];
    if FORBIDDEN.contains(&header.as_str()) {
        return Err(format!(
            "keyward cannot inject `{}`: it is a hop-by-hop or framing header",
            header.as_str()
        ));
    }
    Ok(header)
}

/// A query parameter name that needs no percent-encoding (so what is matched is what is sent).
pub(crate) fn check_query_param(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        return Err(
            "a query parameter name may use only letters, digits, `-`, `.`, `_` and `~`".into(),
        );
    }
    Ok(())
}

/// The `basic` username: RFC 7617 forbids `:` in it, and control bytes would break the header.
pub(crate) fn check_basic_username(name: &str) -> Result<(), String> {
    if name.contains(':') || name.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("a basic-auth username must not contain `:` or control characters".into());
    }
    Ok(())
}

/// An environment variable name as POSIX shells accept it.
pub(crate) fn check_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_no_calendar_units() {
        assert_eq!(
            parse_duration("30m"),
            Ok(std::time::Duration::from_secs(1800))
        );
        assert_eq!(
            parse_duration("1h 30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("2d"),
            Ok(std::time::Duration::from_secs(172_800))
        );
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        for months in ["30M", "1h30M", "1month", "2 months", "1y", "1year"] {
            let why = parse_duration(months).unwrap_err();
            assert!(why.contains("months"), "{months}: {why}");
        }
        assert!(parse_duration("30").unwrap_err().contains("unit"));
        assert!(parse_duration("").is_err());
        // It has a unit: what is wrong is its size.
        assert_eq!(
            parse_duration("99999999999999999999d"),
            Err("is too long a duration")
        );
    }

    #[test]
    fn host_patterns() {
        let ok = [
            (
                "api.github.com",
                HostPattern::Exact("api.github.com".into()),
            ),
            (
                "API.GitHub.com.",
                HostPattern::Exact("api.github.com".into()),
            ),
            ("*.example.com", HostPattern::Wildcard("example.com".into())),
            ("127.0.0.1", HostPattern::Exact("127.0.0.1".into())),
            ("::1", HostPattern::Exact("::1".into())),
            ("[::1]", HostPattern::Exact("::1".into())),
            ("[0:0::1]", HostPattern::Exact("::1".into())),
            ("localhost", HostPattern::Exact("localhost".into())),
            ("_dmarc.x.org", HostPattern::Exact("_dmarc.x.org".into())),
        ];
        for (text, want) in ok {
            assert_eq!(parse_host_pattern(text), Ok(want), "{text}");
        }
        let bad = [
            "",
            "api.github.com:443",
            "https://api.github.com",
            "api.github.com/x",
            "u@h.com",
            "a..b",
            ".a.b",
            "a.b..",
            "*.com",
            "*",
            "a.*.com",
            "*.*.x.com",
            "**.x.com",
            "*.1.2.3.4",
            "*.[::1]",
            "1.2.3",
            "-a.com",
            "a-.com",
            "a b.com",
            "é.com",
            "[::1",
            "[nope]",
            "a.b.c:x",
            "::ffff:127.0.0.1",
            "[::FFFF:7f00:1]",
        ];
        for text in bad {
            assert!(parse_host_pattern(text).is_err(), "{text:?} accepted");
        }
        // A zone id is not a port: said as what it is.
        for text in ["fe80::1%lo", "[fe80::1%25lo]", "a%2eb.com"] {
            let err = parse_host_pattern(text).unwrap_err();
            assert!(err.contains("must not contain `%`"), "{text}: {err}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(parse_host_pattern(&long_label).is_err());
    }

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("127.0.0.1:9443"),
            Ok(("127.0.0.1".into(), 9443))
        );
        assert_eq!(parse_authority("[::1]:9443"), Ok(("::1".into(), 9443)));
        assert_eq!(
            parse_authority("Backend.Internal:443"),
            Ok(("backend.internal".into(), 443))
        );
        for bad in [
            "127.0.0.1",
            "::1:443",
            "h:0",
            "h:65536",
            "h:+1",
            ":443",
            "[::1]",
            "h:",
            "a/b:1",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} accepted");
        }
        // Each says what is wrong with it.
        for (bad, says) in [
            ("http://1.2.3.4:80", "without a scheme"),
            ("::1:9443", "in brackets"),
            ("a.test:0", "from 1 to 65535"),
        ] {
            let why = parse_authority(bad).unwrap_err();
            assert!(why.contains(says), "{bad}: {why}");
        }
    }

    #[test]
    fn templates() {
        assert_eq!(
            split_template("Bearer ${credential}"),
            Ok(("Bearer ".into(), String::new()))
        );
        assert_eq!(
            split_template("${credential}"),
            Ok((String::new(), String::new()))
        );
        assert_eq!(
            split_template("a${credential}b"),
            Ok(("a".into(), "b".into()))
        );
        for bad in [
            "Bearer",
            "${credential}${credential}",
            "${other} ${credential}",
            "x\n${credential}",
            "${credential}\u{e9}",
        ] {
            assert!(split_template(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn inject_headers() {
        assert_eq!(
            check_inject_header("Authorization").map(|h| h.to_string()),
            Ok("authorization".into())
        );
        assert!(check_inject_header("x-api-key").is_ok());
        for bad in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "Proxy-Authorization",
            "bad header",
            "",
        ] {
            assert!(check_inject_header(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn secret_looking_names() {
        for secret in [
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "sk-proj-abc",
            "AKIAIOSFODNN7EXAMPLE",
            "a1b2c3d4e5f6g7h8i9j0k1l2m3",
            "has space",
        ] {
            assert!(looks_like_secret(secret), "{secret}");
        }
        for name in [
            "github_token",
            "openai_key",
            "github.issues.read",
            "vault-db-2",
        ] {
            assert!(!looks_like_secret(name), "{name}");
        }
    }

    #[test]
    fn pasted_parts_of_a_source_are_hidden_and_ordinary_paths_kept() {
        for (text, shown) in [
            ("./sk-live-abcdef1234567890abcdef", "./(hidden)"),
            (
                "/run/secrets/ghp_16C7e42F292c6912E7710c838347Ae178B4a",
                "/run/secrets/(hidden)",
            ),
            ("ghp_16C7e42F292c6912E7710c838347Ae178B4a", "(hidden)"),
            (
                "/var/run/secrets/token-2024-01-01",
                "/var/run/secrets/token-2024-01-01",
            ),
            ("/etc/keyward/github_token", "/etc/keyward/github_token"),
            ("GITHUB_TOKEN", "GITHUB_TOKEN"),
            ("vault read sk_live_0123456789abcdef", "vault read (hidden)"),
            // Base64 secrets hold `/`, which leaves their parts short.
            ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "(hidden)"),
            (
                "./dGhpcyBpcyBhIHNlY3JldCB2YWx1ZQ/x+y/z9a8b7c6d5e4f3g2h1",
                "(hidden)",
            ),
            ("/run/secrets/github/token", "/run/secrets/github/token"),
            (
                "/Users/JaneDoe/Library/KeywardKeys",
                "/Users/JaneDoe/Library/KeywardKeys",
            ),
            (
                "/etc/keyward/creds/2024-01-01/github-token",
                "/etc/keyward/creds/2024-01-01/github-token",
            ),
        ] {
            assert_eq!(hide_pasted_parts(text), shown, "{text}");
        }
    }

    #[test]
    fn names_params_users_envs() {
        assert!(check_name("github.issues.read").is_ok());
        assert!(check_name("triage-bot_2").is_ok());
        for bad in ["", ".x", "-x", "a b", "a/b", "ü"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(129)).is_err());
        assert!(check_query_param("api_key").is_ok());
        assert!(check_query_param("a&b").is_err());
        assert!(check_basic_username("user").is_ok());
        assert!(check_basic_username("u:p").is_err());
        assert!(check_env_name("GITHUB_TOKEN") && check_env_name("_x1"));
        assert!(!check_env_name("1X") && !check_env_name("") && !check_env_name("A-B"));
    }
}
