//! Putting a credential into a request that holds a `Permit`: a header (from a template), a
//! query parameter, or Basic authentication, replacing whatever the agent sent there.

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use super::value::percent_encode;
use super::{CredentialStore, CredentialValue};
use crate::decide::Permit;
use crate::policy::{CompiledPolicy, Injection};
use crate::reason::Reason;
use crate::secret::{base64_zeroizing, Secret};

/// Puts the permit's credential into the request, replacing whatever the agent sent in that
/// place. Hop-by-hop headers must already be gone (so `Connection` cannot strip it).
/// What was injected: the credential's index and value (for redacting reflections).
pub struct Injected {
    pub credential: usize,
    pub value: Arc<CredentialValue>,
}

pub fn inject(
    parts: &mut Parts,
    permit: &Permit,
    policy: &CompiledPolicy,
    store: &CredentialStore,
) -> Result<Option<Injected>, Reason> {
    let Some(injection) = &policy.service_at(permit.service()).inject else {
        return Ok(None);
    };
    let idx = injection.credential();
    let value = store.get(idx).ok_or(Reason::CredentialUnavailable)?;
    let secret = value.secret();
    match injection {
        Injection::Header {
            name,
            prefix,
            suffix,
            ..
        } => {
            let mut value = zeroize::Zeroizing::new(String::with_capacity(
                prefix.len() + secret.expose().len() + suffix.len(),
            ));
            value.push_str(prefix);
            value.push_str(secret.expose());
            value.push_str(suffix);
            set_header(parts, name, &value)?;
        }
        Injection::Basic { username, .. } => {
            let encoded = basic_pair(username, secret);
            let mut value = zeroize::Zeroizing::new(String::with_capacity(6 + encoded.len()));
            value.push_str("Basic ");
            value.push_str(&encoded);
            set_header(parts, &AUTHORIZATION, &value)?;
        }
        Injection::Query { param, .. } => {
            parts.uri = with_query_param(&parts.uri, param, secret.expose())
                .ok_or(Reason::CredentialUnavailable)?;
        }
    }
    Ok(Some(Injected {
        credential: idx,
        value,
    }))
}

/// `base64(username:secret)` as Basic authentication sends it, in buffers that wipe themselves.
pub fn basic_pair(username: &str, secret: &Secret) -> zeroize::Zeroizing<String> {
    let secret = secret.expose();
    let mut pair =
        zeroize::Zeroizing::new(String::with_capacity(username.len() + 1 + secret.len()));
    pair.push_str(username);
    pair.push(':');
    pair.push_str(secret);
    base64_zeroizing(&STANDARD, pair.as_bytes())
}

fn set_header(parts: &mut Parts, name: &HeaderName, value: &str) -> Result<(), Reason> {
    // A value with bytes a header cannot carry is a broken credential, not a request to forward.
    let mut value = HeaderValue::from_str(value).map_err(|_| Reason::CredentialUnavailable)?;
    // SECURITY: keep the credential out of HPACK dynamic tables.
    value.set_sensitive(true);
    parts.headers.remove(name);
    parts.headers.insert(name.clone(), value);
    Ok(())
}

/// The URI with every `param` pair removed (compared after percent-decoding, so `api%5Fkey` is
/// removed too) and `param=<secret>` appended.
fn with_query_param(uri: &Uri, param: &str, secret: &str) -> Option<Uri> {
    let pq = uri.path_and_query()?;
    let mut query = String::new();
    if let Some(q) = pq.query() {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if key == param || decode_query_name(key.as_bytes()).as_ref() == param.as_bytes() {
                continue;
            }
            query.push_str(pair);
            query.push('&');
        }
    }
    query.push_str(&percent_encode(param));
    query.push('=');
    query.push_str(&percent_encode(secret));
    let new_pq = format!("{}?{}", pq.path(), query);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(new_pq).ok()?);
    Uri::from_parts(parts).ok()
}

/// A query parameter name as a server decodes it: `%XX` decoded, `+` a space, and `%uXXXX`
/// as the character it names (ASP.NET and IIS decode it in query strings).
pub fn decode_query_name(name: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !name.iter().any(|&b| b == b'%' || b == b'+') {
        return name.into();
    }
    let hex = |i: usize| {
        name.get(i)
            .and_then(|&b| (b as char).to_digit(16))
            .map(|d| d as u8)
    };
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        let wide = matches!(name.get(i + 1), Some(b'u' | b'U'))
            .then(|| (2..6).try_fold(0u32, |n, k| Some(n << 4 | u32::from(hex(i + k)?))))
            .flatten();
        if let (b'%', Some(code)) = (name[i], wide) {
            let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            i += 6;
            continue;
        }
        match (name[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h << 4) | l);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_injection_replaces_agent_values_in_every_spelling() {
        let uri: Uri = "https://h/p/q?a=1&api_key=fake&api%5Fkey=x&b=2&api%u005Fkey=iis"
            .parse()
            .unwrap();
        let out = with_query_param(&uri, "api_key", "s3cr3t/+=").unwrap();
        assert_eq!(out.path(), "/p/q");
        assert_eq!(out.query(), Some("a=1&b=2&api_key=s3cr3t%2F%2B%3D"));
    }

    #[test]
    fn query_injection_without_query() {
        let uri: Uri = "/x".parse().unwrap();
        let out = with_query_param(&uri, "key", "v").unwrap();
        assert_eq!(out.to_string(), "/x?key=v");
    }
}
