//! `Secret`: the only type that holds credential values, task tokens and the admin token.
//!
//! It never prints its contents (`Debug`/`Display` show `[redacted]`), is not `Serialize`, wipes
//! its bytes on drop, and compares in constant time. Code that needs the bytes calls `expose()`
//! at the one place they are written into a request.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A secret byte string (UTF-8 text in practice: API keys, tokens).
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(Zeroizing::new(value))
    }

    /// The secret's text. Call only where it is written into an upstream request or compared.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison (length is not hidden, content is).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(other).into()
    }
}

/// `bytes` in base64 (no padding), in a buffer that wipes itself: written at its final size,
/// so no reallocation leaves an unwiped copy behind. For encoded forms of secrets.
pub fn base64_zeroizing(
    engine: &base64::engine::GeneralPurpose,
    bytes: &[u8],
) -> Zeroizing<String> {
    use base64::Engine as _;
    let len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    let mut out = Zeroizing::new(String::with_capacity(len));
    engine.encode_string(bytes, &mut out);
    out
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("sk-live-abcdef".to_string());
        assert!(!format!("{s:?}").contains("sk-live"));
        assert!(!format!("{s}").contains("sk-live"));
        assert!(!format!("{:?}", Some(&s)).contains("abcdef"));
    }

    #[test]
    fn compares_by_content() {
        let s = Secret::new("kw_abc".to_string());
        assert!(s.ct_eq(b"kw_abc"));
        assert!(!s.ct_eq(b"kw_abd"));
        assert!(!s.ct_eq(b"kw_ab"));
    }
}
