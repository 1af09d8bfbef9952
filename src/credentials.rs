//! Credentials: reading secret values from their sources, and injecting them into a request
//! that holds a `Permit`.
//!
//! `env:` values are read at load; `file:` values are re-read when the file changes (checked at
//! most once a second, as Kubernetes secret volumes update in place); `exec:` values are fetched
//! at load and refreshed in the background. A source that cannot be read yields
//! `credential_unavailable`: nothing is ever sent without its credential. Values live only in
//! `Secret` and never reach a log, error or record.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use crate::decide::Permit;
use crate::policy::{CompiledPolicy, Injection, SecretSource};
use crate::reason::Reason;
use crate::secret::{base64_zeroizing, Secret};

const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a failed `exec` is tried again (when its `refresh` is longer).
const EXEC_RETRY: Duration = Duration::from_secs(30);
/// How long a command's output may stay open after the command exited (held by a process it
/// started), before what was printed is taken as the value.
const EXEC_LEFTOVER_GRACE: Duration = Duration::from_millis(200);
/// The longest secret a file or a command may hold; more is an error, not a value.
const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// Values shorter than this are not scanned for in requests (they would match by chance).
const MIN_SCAN_LEN: usize = 8;
// `window_hash` reads exactly one u64 per window.
const _: () = assert!(MIN_SCAN_LEN == 8);

/// A value and when it was read.
struct Cached {
    value: Option<Arc<CredentialValue>>,
    /// The value before the last rotation: an upstream may accept it for a while yet, so the
    /// egress scan (and the audit record's redaction) keeps looking for it. One per credential.
    retired: Option<Arc<CredentialValue>>,
    /// The value was kept because reading the source again failed (a reload's `exec`): it is
    /// tried again soon, not after a whole `refresh`.
    stale: bool,
    checked: Instant,
    /// For a `file:` source, the file as it was just before it was read.
    stamp: Option<FileStamp>,
}

impl Cached {
    /// The retired value once `value` replaces this one's.
    fn retired_by(&self, value: &Option<Arc<CredentialValue>>) -> Option<Arc<CredentialValue>> {
        match (&self.value, value) {
            (Some(was), Some(now)) if was.secret.expose() == now.secret.expose() => {
                self.retired.clone()
            }
            (Some(was), _) => Some(was.clone()),
            (None, _) => self.retired.clone(),
        }
    }
}

/// What tells that a file changed: a rotation that renames another file into place (as
/// Kubernetes swaps its `..data` link) changes the inode even where the new file's
/// modification time is older or equal (`cp -p`, an unpacked archive); a rewrite in place
/// changes the change time, which no tool can set back.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.modified().ok(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// A credential's value with the forms that are looked for on every request, derived once per
/// value rather than per request. Every copy zeroizes on drop.
pub struct CredentialValue {
    secret: Secret,
    /// The value lowercased, for places that are case-folded on the way (header names, hosts).
    folded: zeroize::Zeroizing<Vec<u8>>,
    /// The spellings an upstream may reflect it in, for the redactor (`proxy::redact`): raw
    /// always; base64 (standard and URL-safe, at each of the three alignments), percent-encoded
    /// (upper- and lowercase hex, as common encoders leave characters raw), JSON-escaped and
    /// UTF-16 (either byte order) when they differ from it and have at least 4 bytes.
    reflections: Vec<zeroize::Zeroizing<Vec<u8>>>,
    /// For each reflection, which of `GATE_BYTES` it holds (`gate_of`), looked up once here
    /// rather than for every header value and frame the redactor scans.
    reflection_gates: Vec<Option<u8>>,
}

/// Bytes rare in the text APIs answer with, which many spellings hold (`%` percent forms, `\`
/// JSON escapes, NUL in UTF-16): a spelling holding one cannot be in a text without it, and
/// one `memchr` per text answers that for all of them (`proxy::redact`).
pub const GATE_BYTES: [u8; 3] = [b'%', b'\\', 0];

/// The index in `GATE_BYTES` of the first gate byte `needle` holds.
pub fn gate_of(needle: &[u8]) -> Option<u8> {
    let i = GATE_BYTES
        .iter()
        .position(|&g| memchr::memchr(g, needle).is_some())?;
    u8::try_from(i).ok()
}

impl CredentialValue {
    pub fn new(secret: Secret) -> CredentialValue {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use zeroize::Zeroizing;
        let raw = secret.expose().as_bytes();
        // Base64 of a text that holds the value at byte offset 0, 1 or 2 (mod 3), as in
        // `base64("Bearer " + value)`: only the characters made of the value's bits alone are
        // the same whatever surrounds it, so the needle is that stable middle.
        let base64 = |engine, offset: usize| {
            let mut padded = Zeroizing::new(vec![0u8; offset]);
            padded.extend_from_slice(raw);
            let encoded = base64_zeroizing(engine, &padded);
            let start = (8 * offset).div_ceil(6);
            let end = 8 * padded.len() / 6;
            Zeroizing::new(
                encoded
                    .as_bytes()
                    .get(start..end)
                    .unwrap_or_default()
                    .to_vec(),
            )
        };
        let percent = percent_encoded(raw, is_unreserved);
        // Some encoders write lowercase hex digits (`%2f`); only the digits, not the value's
        // own letters (lowercasing the whole form missed every value with a capital letter).
        let percent_lower = lowercase_hex_digits(&percent);
        // Common encoders leave more than RFC 3986's unreserved characters raw.
        let python_quote = percent_encoded(raw, |b| is_unreserved(b) || b == b'/');
        let js_component = percent_encoded(raw, |b| is_unreserved(b) || b"!'()*".contains(&b));
        let js_uri = percent_encoded(raw, |b| {
            is_unreserved(b) || b"!'()*;,/?:@&=+$#".contains(&b)
        });
        let js_escape = js_escape(secret.expose());
        // Form encoding (`+` for a space): Java's `URLEncoder` and the WHATWG serializer keep
        // `*`, PHP's `urlencode` does not (nor `~`, in all three); .NET's `HttpUtility` keeps
        // `!()*` and writes lowercase hex, `WebUtility` the same set in uppercase.
        let form_java = form_encoded(raw, b"-._*");
        let form_php = form_encoded(raw, b"-._");
        let form_dotnet = form_encoded(raw, b"-._!()*");
        let form_dotnet_lower = lowercase_hex_digits(&form_dotnet);
        // Python's `quote_plus` (and `urlencode`), Go's `url.QueryEscape`: RFC 3986's
        // unreserved set raw, a space as `+`.
        let form_python = form_encoded(raw, b"-._~");
        let json = |escape| json_escaped(secret.expose(), escape);
        let utf16 = |big_endian: bool| {
            let mut out = Zeroizing::new(Vec::with_capacity(2 * raw.len()));
            for unit in secret.expose().encode_utf16() {
                out.extend(if big_endian {
                    unit.to_be_bytes()
                } else {
                    unit.to_le_bytes()
                });
            }
            out
        };
        // The raw value always; an encoded form when it differs and is long enough not to match
        // by chance.
        let mut reflections = vec![Zeroizing::new(raw.to_vec())];
        for form in [
            base64(&STANDARD_NO_PAD, 0),
            base64(&URL_SAFE_NO_PAD, 0),
            base64(&STANDARD_NO_PAD, 1),
            base64(&URL_SAFE_NO_PAD, 1),
            base64(&STANDARD_NO_PAD, 2),
            base64(&URL_SAFE_NO_PAD, 2),
            percent,
            percent_lower,
            python_quote,
            js_component,
            js_uri,
            js_escape,
            form_java,
            form_php,
            form_dotnet,
            form_dotnet_lower,
            form_python,
            json(JsonEscape::Minimal),
            json(JsonEscape::Slash),
            json(JsonEscape::Ascii),
            json(JsonEscape::HtmlGo),
            json(JsonEscape::HtmlGson),
            utf16(false),
            utf16(true),
        ] {
            if form.len() >= 4 && !reflections.iter().any(|r| r.as_slice() == form.as_slice()) {
                reflections.push(form);
            }
        }
        CredentialValue {
            folded: Zeroizing::new(raw.to_ascii_lowercase()),
            secret,
            reflection_gates: reflections.iter().map(|r| gate_of(r)).collect(),
            reflections,
        }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// What a response must not carry back to the agent (raw, base64, percent-encoded, inside
    /// a JSON string).
    pub fn reflections(&self) -> &[zeroize::Zeroizing<Vec<u8>>] {
        &self.reflections
    }

    /// `gate_of` each reflection, in the same order.
    pub fn reflection_gates(&self) -> &[Option<u8>] {
        &self.reflection_gates
    }
}

/// How JSON encoders write a string: the minimum (serde_json, Go's `Encoder` with HTML
/// escaping off), also `\/` (PHP's `json_encode`), also non-ASCII as `\uXXXX` (Python's
/// `json.dumps`), or HTML-safe: `<>&` as `\u003c` … (Go's `json.Marshal`, by default) and
/// also `='` (Gson, by default; `=` ends most base64 keys).
#[derive(Clone, Copy, PartialEq)]
enum JsonEscape {
    Minimal,
    Slash,
    Ascii,
    HtmlGo,
    HtmlGson,
}

impl JsonEscape {
    /// Whether an ASCII character this encoder writes as `\uXXXX` (beyond the controls).
    fn html_escapes(self, c: char) -> bool {
        match self {
            JsonEscape::HtmlGo => matches!(c, '<' | '>' | '&'),
            JsonEscape::HtmlGson => matches!(c, '<' | '>' | '&' | '=' | '\''),
            _ => false,
        }
    }
}

/// `value` as it appears inside a JSON string written with `escape`.
fn json_escaped(value: &str, escape: JsonEscape) -> zeroize::Zeroizing<Vec<u8>> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(value.len() * 6));
    let mut units = [0u16; 2];
    let mut unicode = |c: char, out: &mut Vec<u8>| {
        for unit in c.encode_utf16(&mut units).iter() {
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                out.push(HEX[usize::from((unit >> shift) & 15)]);
            }
        }
    };
    for c in value.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '/' if escape == JsonEscape::Slash => out.extend_from_slice(b"\\/"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20
                || (!c.is_ascii() && escape == JsonEscape::Ascii)
                || escape.html_escapes(c)
                // Go and Gson escape the two JavaScript line separators as well.
                || (matches!(c, '\u{2028}' | '\u{2029}')
                    && matches!(escape, JsonEscape::HtmlGo | JsonEscape::HtmlGson)) =>
            {
                unicode(c, &mut out)
            }
            c => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out
}

/// One credential of the policy, by index.
pub struct CredentialSlot {
    name: String,
    source: SecretSource,
    refresh: Duration,
    cache: ArcSwapOption<Cached>,
}

impl CredentialSlot {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// All credentials of one policy generation.
pub struct CredentialStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    slots: Vec<CredentialSlot>,
    /// Every readable value at once, for the egress scan: one load per request instead of one
    /// per credential. Rebuilt whenever a slot's value is replaced.
    scan: ArcSwap<ScanSet>,
    /// Serializes rebuilds, so the last one stored reads the newest slot values.
    rebuild: std::sync::Mutex<()>,
    /// Whether any slot reads a file, whose change is noticed only when it is looked at.
    has_files: bool,
    /// keyward's own secrets (the admin token): never injected, but looked for like a
    /// credential, so no request carries one out and no record keeps one.
    own: ArcSwap<Vec<Arc<CredentialValue>>>,
}

impl StoreInner {
    /// Replaces slot `idx`'s value. The scan set learns it first, so no request can have it
    /// injected before the egress scan looks for it.
    fn store(&self, idx: usize, cached: Cached) {
        self.store_unless_replaced(idx, cached, None);
    }

    /// `store`, but when `read_over` is given only if the slot still holds it: two requests
    /// that check a changed file at once must not put back the value one of them read before
    /// the other stored the new one. The value in effect afterwards.
    fn store_unless_replaced(
        &self,
        idx: usize,
        mut cached: Cached,
        read_over: Option<&Arc<Cached>>,
    ) -> Option<Arc<CredentialValue>> {
        let slot = self.slots.get(idx)?;
        let _one_at_a_time = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let old = slot.cache.load_full();
        if let Some(expected) = read_over {
            if !old.as_ref().is_some_and(|o| Arc::ptr_eq(o, expected)) {
                return old.and_then(|o| o.value.clone());
            }
        }
        if let Some(old) = &old {
            cached.retired = old.retired_by(&cached.value);
        }
        let cached = Arc::new(cached);
        self.rebuild_scan(Some((idx, &cached)));
        let value = cached.value.clone();
        slot.cache.store(Some(cached));
        value
    }

    /// The scan set anew from every slot's values (slot `idx` about to hold `replacing`) and
    /// keyward's own secrets. Called with `rebuild` held.
    fn rebuild_scan(&self, replacing: Option<(usize, &Arc<Cached>)>) {
        let values = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(i, slot)| {
                let held = match replacing {
                    Some((idx, cached)) if idx == i => Some(cached.clone()),
                    _ => slot.cache.load_full(),
                };
                held.map(|c| [c.value.clone(), c.retired.clone()])
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .chain(self.own.load().iter().cloned())
            .collect();
        self.scan.store(Arc::new(ScanSet::new(values)));
    }

    /// Slot `idx`'s current value: a `file:` source is re-checked at most once a
    /// `FILE_CHECK_INTERVAL`. `now` is read from the clock only for those, once per caller.
    fn current(&self, idx: usize, now: &mut Option<Instant>) -> Option<Arc<CredentialValue>> {
        let slot = self.slots.get(idx)?;
        let cached = slot.cache.load_full();
        if let (SecretSource::File(path), Some(c)) = (&slot.source, cached.as_ref()) {
            let now = *now.get_or_insert_with(Instant::now);
            if now.saturating_duration_since(c.checked) >= FILE_CHECK_INTERVAL {
                return self.refresh_file(idx, path, c);
            }
        }
        cached.as_ref().and_then(|c| c.value.clone())
    }

    /// Re-reads a file source if its modification time changed; the value as of now.
    fn refresh_file(
        &self,
        idx: usize,
        path: &PathBuf,
        old: &Arc<Cached>,
    ) -> Option<Arc<CredentialValue>> {
        let stamp = FileStamp::of(path);
        // A file that could not be read is tried again at each check, changed or not: fixing
        // its owner or mode does not always change what the stamp holds.
        let value = if stamp.is_some() && stamp == old.stamp && old.value.is_some() {
            old.value.clone()
        } else {
            match read_file(path) {
                Ok(v) => Some(Arc::new(CredentialValue::new(v))),
                Err(why) => {
                    if old.value.is_some() {
                        let name = self.slots.get(idx).map_or("", |s| s.name.as_str());
                        tracing::warn!(credential = %name, %why, "credential cannot be read any more; requests that need it get 502 credential_unavailable");
                    }
                    None
                }
            }
        };
        let checked = Cached {
            value,
            retired: None,
            stale: false,
            checked: Instant::now(),
            stamp,
        };
        self.store_unless_replaced(idx, checked, Some(old))
    }
}

impl CredentialStore {
    /// Reads every source once (exec sources run now). Unreadable sources are kept and reported
    /// by `unreadable()`; requests needing them get `credential_unavailable`. On a reload,
    /// `previous` is the store being replaced: a command that fails now leaves the value it
    /// gave before (the rule of the refresh), rather than a credential nobody can use until
    /// its next `refresh`; a log rotation's SIGHUP during an outage of the secret store must
    /// not take a working credential away.
    ///
    /// `own` are keyward's own secrets, looked for but never injected (the admin token).
    pub async fn load(
        policy: &CompiledPolicy,
        previous: Option<&CredentialStore>,
        own: &[Arc<Secret>],
    ) -> CredentialStore {
        let defs = &policy.policy().credentials;
        let own: Vec<_> = own
            .iter()
            .map(|s| Arc::new(CredentialValue::new(Secret::clone(s))))
            .collect();
        let inner = StoreInner {
            slots: defs
                .iter()
                .map(|def| CredentialSlot {
                    name: def.name.clone(),
                    source: def.source.clone(),
                    refresh: def.refresh.unwrap_or(Duration::from_secs(300)),
                    cache: ArcSwapOption::empty(),
                })
                .collect(),
            scan: ArcSwap::from_pointee(ScanSet::new(own.clone())),
            rebuild: std::sync::Mutex::new(()),
            has_files: defs
                .iter()
                .any(|def| matches!(def.source, SecretSource::File(_))),
            own: ArcSwap::from_pointee(own),
        };
        for (idx, def) in defs.iter().enumerate() {
            let stamp = match &def.source {
                SecretSource::File(path) => FileStamp::of(path),
                _ => None,
            };
            // What the replaced store held under this name (a reload).
            let before = previous.and_then(|p| p.held(&def.name));
            let kept = before.as_ref().and_then(|(source, cached)| {
                let same_exec =
                    matches!(source, SecretSource::Exec { .. }) && **source == def.source;
                same_exec.then(|| cached.value.clone()).flatten()
            });
            let (value, stale) = match read_source(&def.source).await {
                Ok(v) => (Some(Arc::new(CredentialValue::new(v))), false),
                Err(why) => match kept {
                    Some(kept) => {
                        tracing::warn!(credential = %def.name, %why, "credential cannot be read again; keeping the value read before the reload");
                        (Some(kept), true)
                    }
                    None => {
                        tracing::warn!(credential = %def.name, %why, "credential cannot be read; requests that need it get 502 credential_unavailable");
                        (None, false)
                    }
                },
            };
            inner.store(
                idx,
                Cached {
                    stamp,
                    retired: before.and_then(|(_, cached)| cached.retired_by(&value)),
                    value,
                    stale,
                    checked: Instant::now(),
                },
            );
        }
        CredentialStore {
            inner: Arc::new(inner),
        }
    }

    /// Replaces keyward's own secrets looked for (a rotated admin token, and the one before).
    pub fn set_own(&self, own: &[Arc<Secret>]) {
        let own = own
            .iter()
            .map(|s| Arc::new(CredentialValue::new(Secret::clone(s))))
            .collect();
        let _one_at_a_time = self.inner.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.own.store(Arc::new(own));
        self.inner.rebuild_scan(None);
    }

    /// The source and what is held for the credential `name`, if this store has it.
    fn held(&self, name: &str) -> Option<(&SecretSource, Arc<Cached>)> {
        let slot = self.inner.slots.iter().find(|slot| slot.name == name)?;
        Some((&slot.source, slot.cache.load_full()?))
    }

    /// Starts background refresh for `exec` sources; the tasks end when the store is dropped.
    /// After a failed attempt (or with no value yet) the next comes sooner than `refresh`.
    pub fn spawn_refreshers(&self) {
        for (idx, slot) in self.inner.slots.iter().enumerate() {
            if !matches!(slot.source, SecretSource::Exec { .. }) {
                continue;
            }
            let weak = Arc::downgrade(&self.inner);
            let every = slot.refresh;
            let mut next = first_refresh(slot.cache.load().as_deref(), every);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(next).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let Some(slot) = inner.slots.get(idx) else {
                        return;
                    };
                    let value = match read_source(&slot.source).await {
                        Ok(v) => v,
                        Err(why) => {
                            tracing::warn!(credential = %slot.name, %why, "credential refresh failed; keeping the previous value");
                            next = every.min(EXEC_RETRY);
                            continue;
                        }
                    };
                    next = every;
                    inner.store(
                        idx,
                        Cached {
                            value: Some(Arc::new(CredentialValue::new(value))),
                            retired: None,
                            stale: false,
                            checked: Instant::now(),
                            stamp: None,
                        },
                    );
                }
            });
        }
    }

    /// The current value of credential `idx`, or `None` if it cannot be read now.
    pub fn get(&self, idx: usize) -> Option<Arc<CredentialValue>> {
        self.inner.current(idx, &mut None)
    }

    pub fn name(&self, idx: usize) -> Option<&str> {
        self.inner.slots.get(idx).map(|s| s.name.as_str())
    }

    /// Names of credentials that cannot be read now (for readiness).
    pub fn unreadable(&self) -> Vec<&str> {
        self.inner
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.get(i).is_none())
            .map(|(_, slot)| slot.name.as_str())
            .collect()
    }

    /// Whether any header (name or value), the request target or its authority carries a real
    /// credential's value (SPEC §4.3 `secret_egress`), raw, percent-encoded or base64-encoded.
    /// For requests and for CONNECT alike (whose target is its authority).
    pub fn carried_by(&self, uri: &Uri, headers: &http::HeaderMap) -> bool {
        let target = uri
            .path_and_query()
            .map(|p| p.as_str().as_bytes())
            .unwrap_or(b"");
        let mut places: Vec<&[u8]> = vec![target];
        // `Proxy-Authorization` (name and value) is keyward's own and never forwarded: a
        // credential there goes nowhere (and fails authentication), so it is not worth decoding
        // on every request.
        places.extend(
            headers
                .iter()
                .filter(|(name, _)| *name != http::header::PROXY_AUTHORIZATION)
                .map(|(_, v)| v.as_bytes()),
        );
        let mut folded: Vec<&[u8]> = headers
            .keys()
            .filter(|name| *name != http::header::PROXY_AUTHORIZATION)
            .map(|name| name.as_str().as_bytes())
            .collect();
        // The absolute URI's (or `:authority`'s, or CONNECT's) host is looked up, sent as SNI
        // and written as `Host` even when the agent sent no `Host` header.
        if let Some(authority) = uri.authority() {
            folded.push(authority.as_str().as_bytes());
        }
        // Header names arrive lowercased and hosts are case-folded: compare them without case.
        self.scan(&places, &folded)
    }

    /// Whether any of `places` carries a real credential's value in a spelling an upstream
    /// would decode: raw, percent-encoded (any case, any subset of bytes), or base64 (standard
    /// or URL-safe, padded or not, e.g. inside a Basic pair).
    pub fn carried_in(&self, places: &[&[u8]]) -> bool {
        self.scan(places, &[])
    }

    /// The same, ignoring ASCII case: for what is case-folded on the way (header names, hosts).
    pub fn carried_in_any_case(&self, places: &[&[u8]]) -> bool {
        self.scan(&[], places)
    }

    /// One pass over the credentials for both kinds of places.
    fn scan(&self, exact: &[&[u8]], folded: &[&[u8]]) -> bool {
        if self.inner.has_files {
            // A changed file is re-read here, so its new value is in the set loaded below.
            let mut now = None;
            for (idx, slot) in self.inner.slots.iter().enumerate() {
                if matches!(slot.source, SecretSource::File(_)) {
                    self.inner.current(idx, &mut now);
                }
            }
        }
        let set = self.inner.scan.load();
        let exact = Places::new(exact, false);
        let folded = Places::new(folded, true);
        if !set.may_start_in(&exact) && !set.may_start_in(&folded) {
            return false;
        }
        set.values.iter().any(|value| {
            exact.contain(value.secret.expose().as_bytes()) || folded.contain(&value.folded)
        })
    }
}

/// Every readable credential value of a store, and the first `MIN_SCAN_LEN` bytes of each
/// (as is and lowercased) hashed into a 2^16-bit filter: a request none of whose windows hits
/// the filter carries no value, which is decided without looking at any value. With 50 values
/// about one request in twenty with 100 windows goes on to the exact search.
struct ScanSet {
    values: Vec<Arc<CredentialValue>>,
    firsts: Box<[u64; 1024]>,
}

impl ScanSet {
    fn new(values: Vec<Arc<CredentialValue>>) -> ScanSet {
        let mut firsts = Box::new([0u64; 1024]);
        let needles = values
            .iter()
            .flat_map(|v| [v.secret.expose().as_bytes(), v.folded.as_slice()]);
        for first in needles.filter_map(|n| n.get(..MIN_SCAN_LEN)) {
            let bit = filter_bit(window_hash(first));
            if let Some(word) = firsts.get_mut(bit >> 6) {
                *word |= 1 << (bit & 63);
            }
        }
        ScanSet { values, firsts }
    }

    /// False when no value can start at any window of `places`.
    fn may_start_in(&self, places: &Places<'_>) -> bool {
        places
            .hay
            .iter()
            .flat_map(|place| place.windows(MIN_SCAN_LEN))
            .any(|w| {
                let bit = filter_bit(window_hash(w));
                self.firsts
                    .get(bit >> 6)
                    .is_some_and(|word| word & (1 << (bit & 63)) != 0)
            })
    }
}

fn filter_bit(hash: u64) -> usize {
    (hash & 0xffff) as usize
}

/// Every spelling of some places, ready to be searched for credential values.
struct Places<'a> {
    hay: Vec<std::borrow::Cow<'a, [u8]>>,
    /// A value longer than every place cannot be in any.
    longest: usize,
}

impl<'a> Places<'a> {
    fn new(places: &[&'a [u8]], fold: bool) -> Places<'a> {
        let mut hay = spellings(places);
        if fold {
            // Most of these (header names) are lowercase already and stay borrowed.
            for h in hay
                .iter_mut()
                .filter(|h| h.iter().any(u8::is_ascii_uppercase))
            {
                h.to_mut().make_ascii_lowercase();
            }
        }
        Places {
            longest: hay.iter().map(|h| h.len()).max().unwrap_or(0),
            hay,
        }
    }

    fn contain(&self, needle: &[u8]) -> bool {
        if needle.len() < MIN_SCAN_LEN || needle.len() > self.longest {
            return false;
        }
        let finder = memchr::memmem::Finder::new(needle);
        self.hay.iter().any(|h| finder.find(h).is_some())
    }
}

/// A keyed multiply-xorshift hash of one `MIN_SCAN_LEN`-byte window. Keyed per process, so
/// which filter bit a secret's first window sets cannot be learned from outside.
fn window_hash(w: &[u8]) -> u64 {
    static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let key = *KEY.get_or_init(|| {
        let mut k = [0u8; 8];
        crate::tasks::fill_random(&mut k);
        u64::from_le_bytes(k) | 1
    });
    let mut x = [0u8; 8];
    if let Some(w) = w.get(..8) {
        x.copy_from_slice(w);
    }
    let mut h = (u64::from_le_bytes(x) ^ key).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

/// Each place as sent, percent-decoded, and with its base64 runs decoded (also after
/// percent-decoding): every spelling an upstream might decode a credential from.
fn spellings<'a>(places: &[&'a [u8]]) -> Vec<std::borrow::Cow<'a, [u8]>> {
    let mut hay = Vec::with_capacity(places.len());
    for &p in places {
        hay.push(p.into());
        if let Some(decoded) = percent_decoded(p) {
            decoded_base64_tokens(&decoded, &mut hay);
            hay.push(decoded.into());
        }
        decoded_base64_tokens(p, &mut hay);
    }
    hay
}

/// `bytes` with every valid `%XX` decoded, or `None` if it has none.
fn percent_decoded(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.contains(&b'%') {
        return None;
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h << 4) | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Some(out)
}

/// Decodes every run of base64 characters (either alphabet, padding ignored) long enough to
/// hold a scanned secret, into `out`.
fn decoded_base64_tokens<'a>(bytes: &[u8], out: &mut Vec<std::borrow::Cow<'a, [u8]>>) {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    const STD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
    const URL: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);
    let is_b64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_');
    // A secret of MIN_SCAN_LEN bytes takes at least this many base64 characters.
    let min = MIN_SCAN_LEN.div_ceil(3) * 4;
    for token in bytes.split(|b| !is_b64(b)).filter(|t| t.len() >= min) {
        // Decode from each of the four offsets (the secret may follow other encoded bytes or
        // a stray character), each cut to whole quanta; a token mixing both alphabets'
        // specials decodes in neither and cannot be what an upstream decodes either.
        for start in 0..4 {
            let rest = &token[start..];
            if rest.len() < min {
                break;
            }
            let whole = &rest[..rest.len() - rest.len() % 4];
            let decoded = [&STD, &URL]
                .into_iter()
                .flat_map(|engine| [rest, whole].into_iter().map(move |t| engine.decode(t)))
                .find_map(Result::ok);
            if let Some(d) = decoded {
                out.push(d.into());
            }
        }
    }
}

/// Why a source gave no value, for the operator. Names the source (a variable, a path, a
/// command's program), never anything it read, nor a command's arguments or output.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("environment variable {0} is not valid UTF-8")]
    EnvNotUnicode(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("file {0} cannot be read: {1}")]
    File(String, std::io::ErrorKind),
    #[error("file {0} is empty")]
    FileEmpty(String),
    #[error("{0} holds a line break or another control character inside its value (more than one line?)")]
    ControlInValue(String),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("file {0} holds more than {1} bytes: not a secret")]
    FileTooLong(String, u64),
    #[error("`exec` has no command")]
    ExecNone,
    #[error("command `{0}` could not be run: {1}")]
    ExecSpawn(String, std::io::ErrorKind),
    #[error("command `{0}` did not finish within {1} s")]
    ExecTimeout(String, u64),
    #[error("command `{0}` failed ({1})")]
    ExecFailed(String, std::process::ExitStatus),
    #[error("command `{0}` printed nothing (or only a line break)")]
    ExecEmpty(String),
    #[error("command `{0}` printed text that is not UTF-8")]
    ExecNotUtf8(String),
    #[error("command `{0}` printed more than {1} bytes: not a secret")]
    ExecTooLong(String, u64),
}

/// When an `exec` source is first run again: after `refresh`, or sooner when the read at load
/// failed (no value, or one kept from before a reload).
fn first_refresh(cached: Option<&Cached>, every: Duration) -> Duration {
    match cached {
        Some(c) if c.value.is_some() && !c.stale => every,
        _ => every.min(EXEC_RETRY),
    }
}

/// Reads a secret from its source.
pub async fn read_source(source: &SecretSource) -> Result<Secret, SourceError> {
    match source {
        SecretSource::Env(name) => match std::env::var(name) {
            Ok(v) => one_line(
                trimmed(v).ok_or_else(|| SourceError::EnvEmpty(name.clone()))?,
                || format!("environment variable {name}"),
            ),
            Err(std::env::VarError::NotPresent) => Err(SourceError::EnvUnset(name.clone())),
            Err(std::env::VarError::NotUnicode(_)) => Err(SourceError::EnvNotUnicode(name.clone())),
        },
        SecretSource::File(path) => read_file(path),
        SecretSource::Exec { argv } => read_exec(argv).await,
    }
}

fn read_file(path: &PathBuf) -> Result<Secret, SourceError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = || path.display().to_string();
    let fail = |e: std::io::Error| SourceError::File(shown(), e.kind());
    // SECURITY: a regular file only, looked at before it is opened (opening a FIFO or a
    // device has effects of its own) and opened without blocking (in case one was swapped in
    // since): a FIFO would hold the read, and with it the worker thread that checks the file
    // for a request.
    if !std::fs::metadata(path).map_err(fail)?.is_file() {
        return Err(SourceError::NotAFile(shown()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(fail)?;
    if !file.metadata().map_err(fail)?.is_file() {
        return Err(SourceError::NotAFile(shown()));
    }
    // Bounded: `file:/dev/zero` or a log file named by mistake must not fill memory.
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(SourceError::FileTooLong(shown(), MAX_SECRET_BYTES));
    }
    let text = String::from_utf8(std::mem::take(&mut *bytes)).map_err(|e| {
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        SourceError::File(shown(), std::io::ErrorKind::InvalidData)
    })?;
    let secret = trimmed(text).ok_or_else(|| SourceError::FileEmpty(shown()))?;
    one_line(secret, || format!("file {}", shown()))
}

/// SECURITY: two lines (`A\nB`) cannot go into a header: every request would fail while the
/// credential looked readable. Refused where it is read (at start, reload, refresh and file
/// change), so `/readyz` and the log say why.
fn one_line(secret: Secret, shown: impl FnOnce() -> String) -> Result<Secret, SourceError> {
    let control = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f;
    match secret.expose().bytes().any(control) {
        true => Err(SourceError::ControlInValue(shown())),
        false => Ok(secret),
    }
}

/// Runs the command in a process group of its own and reads what it prints. It is done when
/// it exits: a process it left holding its output open gets a moment to finish, and then
/// everything left in its group is killed (so is everything after a timeout). A daemon the
/// command starts on purpose leaves the group first (`setsid`), as daemons do.
async fn read_exec(argv: &[String]) -> Result<Secret, SourceError> {
    use tokio::io::AsyncReadExt;
    let (program, args) = argv.split_first().ok_or(SourceError::ExecNone)?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| SourceError::ExecSpawn(program.clone(), e.kind()))?;
    let _group = ProcessGroup(child.id());
    let Some(stdout) = child.stdout.take() else {
        return Err(SourceError::ExecSpawn(
            program.clone(),
            std::io::ErrorKind::BrokenPipe,
        ));
    };
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    let run = async {
        let mut bounded = stdout.take(MAX_SECRET_BYTES + 1);
        let mut read = std::pin::pin!(bounded.read_to_end(&mut out));
        tokio::select! {
            status = child.wait() => {
                // What the command printed is in the pipe already.
                let _ = tokio::time::timeout(EXEC_LEFTOVER_GRACE, &mut read).await;
                status
            }
            read = &mut read => {
                // Past the bound, the command is killed (it may print forever).
                if read? as u64 > MAX_SECRET_BYTES {
                    return Ok(None);
                }
                child.wait().await
            }
        }
        .map(Some)
    };
    let status = tokio::time::timeout(EXEC_TIMEOUT, run)
        .await
        .map_err(|_| SourceError::ExecTimeout(program.clone(), EXEC_TIMEOUT.as_secs()))?
        .map_err(|e| SourceError::ExecSpawn(program.clone(), e.kind()))?;
    if status.is_none() || out.len() as u64 > MAX_SECRET_BYTES {
        return Err(SourceError::ExecTooLong(program.clone(), MAX_SECRET_BYTES));
    }
    if let Some(status) = status.filter(|s| !s.success()) {
        return Err(SourceError::ExecFailed(program.clone(), status));
    }
    let text = String::from_utf8(std::mem::take(&mut *out)).map_err(|e| {
        // The bytes read are the secret's, wiped like it.
        zeroize::Zeroize::zeroize(&mut e.into_bytes());
        SourceError::ExecNotUtf8(program.clone())
    })?;
    let secret = trimmed(text).ok_or_else(|| SourceError::ExecEmpty(program.clone()))?;
    one_line(secret, || format!("command `{program}`"))
}

/// A command's process group, killed when the read ends however it ends.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let pid = self
            .0
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // ESRCH (nothing left in the group) is the usual answer.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Secrets written by editors and `echo` end in a newline; the newline is never part of a key.
/// Nor are spaces or tabs at either end: an upstream's HTTP parser drops them from the header
/// keyward injects, so the key it uses is the trimmed one, and that is the one the redactor and
/// the egress scan must look for. (The bytes cut stay in the buffer, which wipes all of itself.)
fn trimmed(mut v: String) -> Option<Secret> {
    // Unicode's blanks too (a no-break space pasted from a web console, a byte-order mark):
    // an upstream that trims what it reads and echoes it back would show the bare value.
    let blank = |c: char| c.is_whitespace() || c == '\u{feff}';
    let keep = v.trim_end_matches(blank).len();
    v.truncate(keep);
    let lead = v.len() - v.trim_start_matches(blank).len();
    v.drain(..lead);
    (!v.is_empty()).then(|| Secret::new(v))
}

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

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() * 3);
    percent_encode_into(s.as_bytes(), is_unreserved, &mut out);
    // Only ASCII was pushed.
    String::from_utf8(out).unwrap_or_default()
}

/// RFC 3986's unreserved characters: never percent-encoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends `bytes` percent-encoded (uppercase hex, UTF-8 bytes one by one) but for those
/// `keep` leaves raw.
fn percent_encode_into(bytes: &[u8], keep: impl Fn(u8) -> bool, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if keep(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// `value` as JavaScript's legacy `escape()` writes it: ASCII letters, digits and `@*_+-./`
/// raw, other characters below U+0100 as `%XX`, the rest as `%uXXXX` per UTF-16 unit.
fn js_escape(value: &str) -> zeroize::Zeroizing<Vec<u8>> {
    use std::io::Write as _;
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(value.len() * 6));
    let mut units = [0u16; 2];
    for c in value.chars() {
        match u32::from(c) {
            n if n < 0x80 && (c.is_ascii_alphanumeric() || "@*_+-./".contains(c)) => {
                out.push(n as u8)
            }
            n if n < 0x100 => {
                let _ = write!(out, "%{n:02X}");
            }
            _ => {
                for unit in c.encode_utf16(&mut units).iter() {
                    let _ = write!(out, "%u{unit:04X}");
                }
            }
        }
    }
    out
}

/// A percent-encoded text with its `%XX` digits in lowercase, everything else as it is.
fn lowercase_hex_digits(encoded: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(encoded.to_vec());
    let mut i = 0;
    while let Some(at) = out.get(i..).and_then(|rest| memchr::memchr(b'%', rest)) {
        let start = i + at + 1;
        for b in out.iter_mut().skip(start).take(2) {
            b.make_ascii_lowercase();
        }
        i = start + 2;
    }
    out
}

/// `bytes` as an encoder that leaves `keep` raw writes them, in a buffer that wipes itself.
fn percent_encoded(bytes: &[u8], keep: impl Fn(u8) -> bool) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(bytes.len() * 3));
    percent_encode_into(bytes, keep, &mut out);
    out
}

/// `bytes` form-encoded: a space as `+`, `keep` and ASCII letters and digits raw, the rest
/// `%XX` (uppercase hex, UTF-8 bytes one by one).
fn form_encoded(bytes: &[u8], keep: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(bytes.len() * 3));
    for &b in bytes {
        if b == b' ' {
            out.push(b'+');
        } else {
            percent_encode_into(
                &[b],
                |b| b.is_ascii_alphanumeric() || keep.contains(&b),
                &mut out,
            );
        }
    }
    out
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

    fn exec(script: &str) -> SecretSource {
        SecretSource::Exec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
        }
    }

    /// Whether process `pid` is gone (or a zombie nobody reaped yet: it runs no more).
    fn ended(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    // A command that leaves a child holding its output open (`cmd &` in a script, a helper
    // that forks) used to be waited for until the 30 s timeout, and the child lived on.
    #[tokio::test]
    async fn an_exec_is_done_when_it_exits_and_what_it_left_running_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 60 & echo $! > {}; echo sk_from_exec_123",
            pid_file.display()
        );
        let started = Instant::now();
        let secret = read_source(&exec(&script)).await.unwrap();
        assert_eq!(secret.expose(), "sk_from_exec_123");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ended(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ended(pid), "the command's leftover child {pid} still runs");
    }

    // `yes`, or `file:/dev/zero`, must not fill memory: a secret is short.
    #[tokio::test]
    async fn endless_sources_are_an_error_not_a_value() {
        let err = read_source(&exec("yes sk_again")).await.unwrap_err();
        assert!(matches!(err, SourceError::ExecTooLong(..)), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'k'; 1 << 20]).unwrap();
        let err = read_source(&SecretSource::File(big.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::FileTooLong(..)), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "file {} holds more than 65536 bytes: not a secret",
                big.display()
            )
        );
    }

    // A value of two lines could not go into a header: refused at start and at a rotation
    // alike (the rotated file is read by the request path, not by `read_source`).
    #[test]
    fn a_second_line_is_refused_from_a_file_at_start_and_at_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "sk_line_one\nsk_line_two\n").unwrap();
        let err = read_file(&path).unwrap_err();
        assert!(matches!(err, SourceError::ControlInValue(_)), "{err}");

        std::fs::write(&path, "sk_single_line_value\n").unwrap();
        let store = file_store(&[&path]);
        assert!(store.get(0).is_some());
        std::fs::write(&path, "sk_single_line_value\nsk_second\n").unwrap();
        std::thread::sleep(FILE_CHECK_INTERVAL + Duration::from_millis(50));
        assert!(store.get(0).is_none(), "a two-line value was taken");
    }

    // A FIFO would block the read (and the worker thread that checks the file for a request)
    // until someone writes to it; a device or a directory is not a secret either.
    #[tokio::test]
    async fn only_a_regular_file_is_read_and_never_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for path in [fifo, "/dev/zero".into(), dir.path().to_path_buf()] {
            let source = SecretSource::File(path.clone());
            let read = tokio::time::timeout(Duration::from_secs(5), read_source(&source));
            let err = read.await.expect("the read did not wait").unwrap_err();
            assert!(
                matches!(err, SourceError::NotAFile(_) | SourceError::File(..)),
                "{}: {err}",
                path.display()
            );
        }
    }

    #[tokio::test]
    async fn exec_failures_name_the_program_never_the_output() {
        let err = read_source(&exec("echo sk_printed; exit 3"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::ExecFailed(..)), "{err}");
        assert!(!err.to_string().contains("sk_printed"), "{err}");
        let err = read_source(&exec("echo")).await.unwrap_err();
        assert!(matches!(err, SourceError::ExecEmpty(..)), "{err}");
        let err = read_source(&exec("printf 'sk\\377'")).await.unwrap_err();
        assert!(matches!(err, SourceError::ExecNotUtf8(..)), "{err}");
        let err = read_source(&exec("printf 'sk_line_one\\nsk_line_two\\n'"))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::ControlInValue(..)), "{err}");
        assert_eq!(
            err.to_string(),
            "command `sh` holds a line break or another control character inside its value (more than one line?)"
        );
        let secret = read_source(&exec("printf 'sk_value\\r\\n'")).await.unwrap();
        assert_eq!(secret.expose(), "sk_value");
    }

    #[test]
    fn the_scan_filter_never_misses_a_present_secret() {
        let secret = "sk_live_0123456789abcdef";
        let set = ScanSet::new(vec![Arc::new(CredentialValue::new(Secret::new(
            secret.into(),
        )))]);
        for at in 0..40 {
            let mut place = vec![b'x'; at];
            place.extend_from_slice(secret.as_bytes());
            place.extend_from_slice(b"-tail");
            assert!(set.may_start_in(&Places::new(&[&place], false)), "at {at}");
            let upper = place.to_ascii_uppercase();
            assert!(set.may_start_in(&Places::new(&[&upper], true)), "at {at}");
        }
        // Nothing to find in places shorter than a window, nor in an empty set.
        assert!(!set.may_start_in(&Places::new(&[b"short"], false)));
        let empty = ScanSet::new(Vec::new());
        assert!(!empty.may_start_in(&Places::new(&[secret.as_bytes()], false)));
    }

    /// A store over `file:` sources, as `load` builds it.
    fn file_store(paths: &[&std::path::Path]) -> CredentialStore {
        let sources: Vec<SecretSource> = paths
            .iter()
            .map(|p| SecretSource::File(p.to_path_buf()))
            .collect();
        let inner = StoreInner {
            slots: sources
                .iter()
                .enumerate()
                .map(|(i, source)| CredentialSlot {
                    name: format!("c{i}"),
                    source: source.clone(),
                    refresh: Duration::from_secs(300),
                    cache: ArcSwapOption::empty(),
                })
                .collect(),
            scan: ArcSwap::from_pointee(ScanSet::new(Vec::new())),
            rebuild: std::sync::Mutex::new(()),
            has_files: true,
            own: ArcSwap::from_pointee(Vec::new()),
        };
        for (idx, source) in sources.iter().enumerate() {
            let SecretSource::File(path) = source else {
                unreachable!()
            };
            let stamp = FileStamp::of(path);
            let value = read_file(path)
                .ok()
                .map(|v| Arc::new(CredentialValue::new(v)));
            inner.store(
                idx,
                Cached {
                    stamp,
                    value,
                    retired: None,
                    stale: false,
                    checked: Instant::now(),
                },
            );
        }
        CredentialStore {
            inner: Arc::new(inner),
        }
    }

    #[test]
    fn the_egress_scan_sees_every_value_and_a_rotated_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "sk_live_first_value_A\n").unwrap();
        std::fs::write(&b, "ghp_second_value_BBBB").unwrap();
        let store = file_store(&[&a, &b]);
        assert!(store.carried_in(&[b"/x?k=sk_live_first_value_A"]));
        assert!(store.carried_in(&[b"Bearer ghp_second_value_BBBB"]));
        assert!(store.carried_in_any_case(&[b"GHP_SECOND_VALUE_BBBB.example"]));
        assert!(!store.carried_in(&[b"/x?k=sk_live_first_value_"]));

        // The file changes (as a Kubernetes secret volume does); once the check interval has
        // passed, the next scan reads it and finds the new value. The old one is still looked
        // for (an upstream may accept it for a while yet), until the next rotation.
        let rotate = |value: &str, ahead: u64| {
            std::fs::write(&a, value).unwrap();
            let later = std::time::SystemTime::now() + Duration::from_secs(ahead);
            let file = std::fs::File::options().write(true).open(&a).unwrap();
            file.set_modified(later).unwrap();
            std::thread::sleep(FILE_CHECK_INTERVAL + Duration::from_millis(50));
        };
        rotate("sk_live_rotated_value_C", 5);
        assert!(store.carried_in(&[b"/x?k=sk_live_rotated_value_C"]));
        assert!(store.carried_in(&[b"/x?k=sk_live_first_value_A"]));
        assert!(store.carried_in(&[b"ghp_second_value_BBBB"]));
        assert_eq!(
            store.get(0).unwrap().secret().expose(),
            "sk_live_rotated_value_C",
            "only the new value is injected"
        );

        rotate("sk_live_third_value_DD", 10);
        assert!(store.carried_in(&[b"/x?k=sk_live_third_value_DD"]));
        assert!(store.carried_in(&[b"/x?k=sk_live_rotated_value_C"]));
        assert!(!store.carried_in(&[b"/x?k=sk_live_first_value_A"]));
    }

    // Kubernetes rotates a secret volume by pointing its `..data` link at a new directory. The
    // new file's modification time may equal the old one's (it is copied with its times, or
    // both were written in one tick): the swap is still seen.
    #[test]
    fn a_kubernetes_style_link_swap_is_seen_whatever_the_new_files_time() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("..2026_old"), dir.path().join("..2026_new"));
        std::fs::create_dir(&old).unwrap();
        std::fs::create_dir(&new).unwrap();
        std::fs::write(old.join("token"), "sk_live_before_rotation").unwrap();
        std::fs::write(new.join("token"), "sk_live_after_rotation_").unwrap();
        let then = std::fs::metadata(old.join("token"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(new.join("token"))
            .unwrap()
            .set_modified(then)
            .unwrap();
        symlink("..2026_old", dir.path().join("..data")).unwrap();
        symlink("..data/token", dir.path().join("token")).unwrap();
        let store = file_store(&[&dir.path().join("token")]);
        assert!(store.carried_in(&[b"Bearer sk_live_before_rotation"]));

        symlink("..2026_new", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        std::thread::sleep(FILE_CHECK_INTERVAL + Duration::from_millis(50));
        assert!(store.carried_in(&[b"Bearer sk_live_after_rotation_"]));
        assert_eq!(
            store.get(0).unwrap().secret().expose(),
            "sk_live_after_rotation_"
        );
    }

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

    #[test]
    fn egress_scan_decodes_percent_and_base64_spellings() {
        let secret = b"sk_live_0123456789";
        let finds = |text: &str| {
            spellings(&[text.as_bytes()])
                .iter()
                .any(|h| memchr::memmem::find(h, secret).is_some())
        };
        let std64 = STANDARD.encode(secret);
        let url64 =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"x:sk_live_0123456789");
        let basic = STANDARD.encode(b"bot:sk_live_0123456789");
        for hit in [
            "sk%5Flive%5F0123456789".to_string(),
            "%73%6b%5f%6c%69%76%65_0123456789".to_string(),
            format!("Bearer {std64}"),
            format!("Basic {basic}"),
            format!("?t={url64}&x=1"),
            format!("x{basic}"),
            format!("k={}", std64.replace('=', "%3D")),
        ] {
            assert!(finds(&hit), "{hit} not found");
        }
        for miss in ["sk_live_012345678", "Bearer abcdefghijklmnop", "%zz%5", ""] {
            assert!(!finds(miss), "{miss} found");
        }
    }

    #[test]
    fn reflections_cover_percent_and_json_spellings() {
        // Lowercase hex digits leave the value's own capitals alone.
        let capitals = CredentialValue::new(Secret::new("AK/Q9=".into()));
        assert!(capitals
            .reflections()
            .iter()
            .any(|r| r.as_slice() == b"AK%2fQ9%3d"));
        let value = CredentialValue::new(Secret::new("k/y\"é+1".into()));
        let forms: Vec<String> = value
            .reflections()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        for want in [
            "k/y\"é+1",           // raw
            "k%2Fy%22%C3%A9%2B1", // percent, RFC 3986
            "k%2fy%22%c3%a9%2b1", // percent, lowercase hex
            "k/y%22%C3%A9%2B1",   // Python's urllib.parse.quote (keeps `/`)
            "k/y%22%C3%A9+1",     // JavaScript's encodeURI() (keeps `/` and `+`)
            "k/y%22%E9+1",        // JavaScript's escape() (Latin-1 as %XX)
            "k/y\\\"é+1",         // JSON (serde_json, Go)
            "k\\/y\\\"é+1",       // JSON with \/ (PHP)
            "k/y\\\"\\u00e9+1",   // JSON, ASCII only (Python)
        ] {
            assert!(forms.iter().any(|f| f == want), "{want} not in {forms:?}");
        }
        // Form encoders and HTML-safe JSON encoders, on a base64 key and on a key of symbols.
        for (secret, want) in [
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok%2Fwith%2Bslash%3Dand%7Etilde%21Q9x",
            ), // Java URLEncoder, WHATWG, PHP urlencode
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok%2fwith%2bslash%3dand%7etilde!Q9x",
            ), // .NET HttpUtility
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok%2Fwith%2Bslash%3Dand%7Etilde!Q9x",
            ), // .NET WebUtility
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok/with+slash\\u003dand~tilde!Q9x",
            ), // Gson
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8~a\\u0026b\\u003cc\\u003ex*y!z'(1)_9",
            ), // Go json.Marshal
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8~a\\u0026b\\u003cc\\u003ex*y!z\\u0027(1)_9",
            ), // Gson
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8%7Ea%26b%3Cc%3Ex*y%21z%27%281%29_9",
            ), // Java URLEncoder
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8%7Ea%26b%3Cc%3Ex%2Ay%21z%27%281%29_9",
            ), // PHP urlencode
            ("Q8~a&b<c>x*y!z'(1)_9", "Q8%7ea%26b%3cc%3ex*y!z%27(1)_9"), // .NET HttpUtility
            ("key with space", "key+with+space"),                       // form encoding
            ("a<b c~d", "a%3Cb+c~d"), // Python's quote_plus, Go's QueryEscape
        ] {
            let value = CredentialValue::new(Secret::new(secret.into()));
            assert!(
                value
                    .reflections()
                    .iter()
                    .any(|r| r.as_slice() == want.as_bytes()),
                "{want} not a reflection of {secret}"
            );
        }
        // A plain token differs from itself only in base64, and in UTF-16 (NUL bytes between).
        let plain = CredentialValue::new(Secret::new("sk_live_0123456789".into()));
        assert!(plain
            .reflections()
            .iter()
            .skip(1)
            .all(|r| !r.contains(&b'_') || r.contains(&0)));
        let forms: Vec<&[u8]> = plain.reflections().iter().map(|r| r.as_slice()).collect();
        for want in [
            &b"s\0k\0_\0l\0i\0v\0e\0_\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\0"[..],
            b"\0s\0k\0_\0l\0i\0v\0e\0_\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009",
        ] {
            assert!(
                forms.contains(&want),
                "{} not a reflection",
                String::from_utf8_lossy(want)
            );
        }
    }

    #[test]
    fn base64_of_any_text_holding_the_value_contains_a_reflection() {
        use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
        for secret in ["sk_live_0123456789", "k/y\"é+1", "SECRETAAAA1111", "abcd"] {
            let value = CredentialValue::new(Secret::new(secret.into()));
            for prefix in ["", "B", "Be", "Bea", "Bearer ", "x:", "{\"token\":\""] {
                for suffix in ["", "!", "\"}", "\r\n"] {
                    let text = format!("{prefix}{secret}{suffix}");
                    for engine in [&STANDARD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                        let encoded = engine.encode(&text);
                        assert!(
                            value.reflections().iter().any(|r| encoded
                                .as_bytes()
                                .windows(r.len())
                                .any(|w| w == r.as_slice())),
                            "base64 of {text:?} ({encoded}) holds no reflection of {secret:?}"
                        );
                    }
                }
            }
        }
    }

    // A command that failed at a reload and left the value from before is run again soon,
    // not after a whole `refresh` (an operator who rotated during an outage waits 30 s).
    #[test]
    fn a_failed_or_kept_exec_value_is_retried_before_its_refresh() {
        let every = Duration::from_secs(600);
        let cached = |value: bool, stale: bool| Cached {
            value: value.then(|| Arc::new(CredentialValue::new(Secret::new("sk_x_1234".into())))),
            retired: None,
            stale,
            checked: Instant::now(),
            stamp: None,
        };
        assert_eq!(first_refresh(Some(&cached(true, false)), every), every);
        assert_eq!(first_refresh(Some(&cached(true, true)), every), EXEC_RETRY);
        assert_eq!(
            first_refresh(Some(&cached(false, false)), every),
            EXEC_RETRY
        );
        assert_eq!(first_refresh(None, every), EXEC_RETRY);
        let short = Duration::from_secs(5);
        assert_eq!(first_refresh(Some(&cached(true, true)), short), short);
    }

    #[test]
    fn blanks_at_either_end_are_not_part_of_a_secret() {
        assert_eq!(trimmed("abc\n".into()).unwrap().expose(), "abc");
        assert!(trimmed("\n".into()).is_none());
        // An upstream reads `X-Api-Key: abc ` as `abc`: the value keyward injects, redacts and
        // scans for is the trimmed one.
        assert_eq!(trimmed(" \tab c \t\r\n".into()).unwrap().expose(), "ab c");
        assert_eq!(
            trimmed("\u{feff}\u{a0}sk_nbsp\u{a0}\u{3000}\n".into())
                .unwrap()
                .expose(),
            "sk_nbsp"
        );
        assert!(trimmed(" \t ".into()).is_none());
    }
}
