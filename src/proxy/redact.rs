//! Redaction of reflected credentials in responses (I4): an upstream that echoes the injected
//! credential (in a header, an error message, a debug endpoint) must not hand it to the agent.
//!
//! The credential is looked for raw, base64-encoded and percent-encoded; each occurrence is
//! replaced by `[redacted]` and counted. Bodies are scanned as they stream, with a carry of
//! the longest needle minus one byte so an occurrence split across frames is still found.
//! Never logs what it finds.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use zeroize::Zeroizing;

use crate::policy::Injection;
use crate::secret::Secret;

const MARK: &[u8] = b"[redacted]";

/// The byte strings that must not reach the agent, and a streaming scanner over them.
pub struct Redactor {
    needles: Vec<Zeroizing<Vec<u8>>>,
    longest: usize,
    carry: BytesMut,
    found: u64,
}

impl Redactor {
    /// Needles for one credential: raw, base64 (standard and URL-safe), percent-encoded.
    /// `extra` adds injected forms that are not the raw secret (e.g. a Basic auth value).
    pub fn new(secret: &Secret, extra: Option<&str>) -> Redactor {
        let raw = secret.expose().as_bytes();
        let mut needles: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(raw.to_vec())];
        let mut push = |n: Vec<u8>| {
            if n.len() >= 4 && !needles.iter().any(|x| x.as_slice() == n.as_slice()) {
                needles.push(Zeroizing::new(n));
            } else {
                drop(Zeroizing::new(n));
            }
        };
        push(
            STANDARD
                .encode(raw)
                .trim_end_matches('=')
                .as_bytes()
                .to_vec(),
        );
        push(URL_SAFE_NO_PAD.encode(raw).into_bytes());
        push(percent_encode(raw));
        if let Some(e) = extra {
            push(e.as_bytes().to_vec());
        }
        let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
        Redactor {
            needles,
            longest,
            carry: BytesMut::new(),
            found: 0,
        }
    }

    /// The redactor for a credential injected as `injection` describes.
    pub fn for_injection(injection: &Injection, secret: &Secret) -> Redactor {
        match injection {
            Injection::Basic { username, .. } => {
                let pair = Zeroizing::new(format!("{username}:{}", secret.expose()));
                let encoded = Zeroizing::new(STANDARD.encode(pair.as_bytes()));
                Redactor::new(secret, Some(encoded.trim_end_matches('=')))
            }
            Injection::Header { .. } | Injection::Query { .. } => Redactor::new(secret, None),
        }
    }

    /// Occurrences replaced so far.
    pub fn found(&self) -> u64 {
        self.found
    }

    /// Replaces occurrences in every header value, and drops headers whose name carries one
    /// (a name cannot hold the marker); returns how many were replaced or dropped.
    pub fn headers(&mut self, headers: &mut HeaderMap) -> u64 {
        let before = self.found;
        let leaked: Vec<http::HeaderName> = headers
            .keys()
            .filter(|name| {
                let name = name.as_str().as_bytes();
                self.needles.iter().any(|n| {
                    name.len() >= n.len()
                        && name.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
                })
            })
            .cloned()
            .collect();
        for name in leaked {
            headers.remove(&name);
            self.found += 1;
        }
        for value in headers.values_mut() {
            let (out, n) = self.replace_all(value.as_bytes());
            if n > 0 {
                self.found += n;
                if let Ok(v) = http::HeaderValue::from_bytes(&out) {
                    *value = v;
                } else {
                    *value = http::HeaderValue::from_static("[redacted]");
                }
            }
        }
        self.found - before
    }

    /// Feeds a body frame; returns the bytes that are safe to send now.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        if self.needles.is_empty() {
            return chunk;
        }
        // The common case — nothing held back, no needle in the frame — passes the frame on
        // without copying it (a large download is not copied three times over).
        if self.carry.is_empty() && !self.contains_any(&chunk) {
            let keep = self.partial_tail(&chunk);
            let mut safe = chunk;
            let held = safe.split_off(safe.len() - keep);
            self.carry.extend_from_slice(&held);
            return safe;
        }
        self.carry.extend_from_slice(&chunk);
        let (out, n) = self.replace_all(&self.carry);
        self.found += n;
        // Hold back only a tail that could be the start of a needle split across frames, so
        // a stream of small events (SSE) is not delayed until more bytes arrive.
        let keep = self.partial_tail(&out);
        let emit = out.len() - keep;
        let mut out = BytesMut::from(&out[..]);
        self.carry = out.split_off(emit);
        out.freeze()
    }

    fn contains_any(&self, hay: &[u8]) -> bool {
        self.needles
            .iter()
            .any(|n| hay.len() >= n.len() && memchr::memmem::find(hay, n).is_some())
    }

    /// Length of the longest tail of `out` that is a proper prefix of some needle.
    fn partial_tail(&self, out: &[u8]) -> usize {
        let max = self.longest.saturating_sub(1).min(out.len());
        (1..=max)
            .rev()
            .find(|&k| {
                let tail = &out[out.len() - k..];
                self.needles
                    .iter()
                    .any(|n| n.len() > k && n.starts_with(tail))
            })
            .unwrap_or(0)
    }

    /// The bytes held back, at the end of the body.
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.carry).freeze()
    }

    fn replace_all(&self, hay: &[u8]) -> (Vec<u8>, u64) {
        let mut out = hay.to_vec();
        let mut count = 0;
        for needle in &self.needles {
            if out.len() < needle.len() {
                continue;
            }
            let finder = memchr::memmem::Finder::new(needle.as_slice());
            if finder.find(&out).is_none() {
                continue;
            }
            let mut next = Vec::with_capacity(out.len());
            let mut last = 0;
            for at in finder.find_iter(&out) {
                if at < last {
                    continue;
                }
                next.extend_from_slice(&out[last..at]);
                next.extend_from_slice(MARK);
                last = at + needle.len();
                count += 1;
            }
            next.extend_from_slice(&out[last..]);
            out = next;
        }
        (out, count)
    }
}

fn percent_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for &b in raw {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor() -> Redactor {
        Redactor::new(&Secret::new("sk-live-0123456789".into()), None)
    }

    #[test]
    fn replaces_raw_base64_and_percent_encoded_forms() {
        let mut r = redactor();
        let b64 = STANDARD.encode("sk-live-0123456789");
        let body = format!("a sk-live-0123456789 b {b64} c sk-live-0123456789");
        let mut out = r.push(Bytes::copy_from_slice(body.as_bytes())).to_vec();
        out.extend_from_slice(&r.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("sk-live"));
        assert!(!text.contains(b64.trim_end_matches('=')));
        assert_eq!(r.found(), 3);
        assert!(text.starts_with("a [redacted] b [redacted]"));
    }

    #[test]
    fn finds_a_secret_split_across_frames() {
        for split in 1..18 {
            let mut r = redactor();
            let body = b"xxsk-live-0123456789yy";
            let mut out = r.push(Bytes::copy_from_slice(&body[..split])).to_vec();
            out.extend_from_slice(&r.push(Bytes::copy_from_slice(&body[split..])));
            out.extend_from_slice(&r.finish());
            assert_eq!(out, b"xx[redacted]yy", "split at {split}");
        }
    }

    #[test]
    fn headers_are_redacted() {
        let mut r = redactor();
        let mut h = HeaderMap::new();
        h.insert("x-echo", "Bearer sk-live-0123456789".parse().unwrap());
        h.insert("x-other", "fine".parse().unwrap());
        assert_eq!(r.headers(&mut h), 1);
        assert_eq!(h["x-echo"], "Bearer [redacted]");
        assert_eq!(h["x-other"], "fine");
    }

    #[test]
    fn header_names_carrying_the_secret_are_dropped() {
        let mut r = redactor();
        let mut h = HeaderMap::new();
        h.insert("x-sk-live-0123456789", "1".parse().unwrap());
        h.insert("x-other", "fine".parse().unwrap());
        assert_eq!(r.headers(&mut h), 1);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-other"], "fine");
    }

    #[test]
    fn frames_that_cannot_start_a_secret_are_not_held_back() {
        let mut r = redactor();
        assert_eq!(
            &r.push(Bytes::copy_from_slice(b"data: event 1\n\n"))[..],
            b"data: event 1\n\n"
        );
        // A tail that may begin the secret waits for the next frame, and only that tail.
        assert_eq!(
            &r.push(Bytes::copy_from_slice(b"data: sk-li"))[..],
            b"data: "
        );
        assert_eq!(&r.push(Bytes::copy_from_slice(b"ve!"))[..], b"sk-live!");
    }

    #[test]
    fn clean_bodies_pass_unchanged() {
        let mut r = redactor();
        let mut out = r.push(Bytes::copy_from_slice(b"hello ")).to_vec();
        out.extend_from_slice(&r.push(Bytes::copy_from_slice(b"world")));
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"hello world");
        assert_eq!(r.found(), 0);
    }
}
