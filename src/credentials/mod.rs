//! Credentials: reading secret values from their sources, and injecting them into a request
//! that holds a `Permit`.
//!
//! `env:` values are read at load; `file:` values are re-read when the file changes (looked at
//! once a second in the background, as Kubernetes secret volumes update in place); `exec:`
//! values are fetched at load and refreshed in the background. A request only loads what is
//! held: no file or process I/O on its path. A source that cannot be read yields
//! `credential_unavailable`: nothing is ever sent without its credential. Values live only in
//! `Secret` and never reach a log, error or record.
//!
//! `value` derives the spellings of a value that are looked for; `source` reads values;
//! `inject` puts one into a request.

mod inject;
mod source;
mod value;

pub use inject::{basic_pair, decode_query_name, inject, Injected};
pub use source::{read_source, SourceError};
pub use value::{gate_of, keys_of, Breaks, CredentialValue, GATE_BYTES};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use http::uri::Uri;

use crate::policy::{CompiledPolicy, SecretSource};
use crate::secret::Secret;
use source::read_file;

const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a failed `exec` is tried again (when its `refresh` is longer).
const EXEC_RETRY: Duration = Duration::from_secs(30);
/// Values shorter than this are not scanned for in requests (they would match by chance).
const MIN_SCAN_LEN: usize = 8;
// `window_hash` reads exactly one u64 per window.
const _: () = assert!(MIN_SCAN_LEN == 8);

/// A value, and what is known of its source.
struct Cached {
    value: Option<Arc<CredentialValue>>,
    /// The value before the last rotation: an upstream may accept it for a while yet, so the
    /// egress scan (and the audit record's redaction) keeps looking for it. One per credential.
    retired: Option<Arc<CredentialValue>>,
    /// The value was kept because reading the source again failed (a reload's `exec`): it is
    /// tried again soon, not after a whole `refresh`.
    stale: bool,
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
/// One credential of the policy, by index.
pub struct CredentialSlot {
    name: String,
    source: SecretSource,
    refresh: Duration,
    cache: ArcSwapOption<Cached>,
    /// A `file:` source's change seen at the last check, read once the file is still so at
    /// the next (`check_file`).
    settling: std::sync::Mutex<Option<Option<FileStamp>>>,
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
    /// keyward's own secrets (the admin token): never injected, but looked for like a
    /// credential, so no request carries one out and no record keeps one.
    own: ArcSwap<Vec<Arc<CredentialValue>>>,
}

impl StoreInner {
    /// Replaces slot `idx`'s value. The scan set learns it first, so no request can have it
    /// injected before the egress scan looks for it.
    fn store(&self, idx: usize, mut cached: Cached) {
        let Some(slot) = self.slots.get(idx) else {
            return;
        };
        let _one_at_a_time = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let old = slot.cache.load_full();
        if let Some(old) = &old {
            cached.retired = old.retired_by(&cached.value);
        }
        let cached = Arc::new(cached);
        self.rebuild_scan(Some((idx, &cached)));
        slot.cache.store(Some(cached));
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
                let owner = Carried::Credential(slot.name.clone());
                held.map(|c| [c.value.clone(), c.retired.clone()])
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(move |v| (owner.clone(), v))
            })
            .chain(
                self.own
                    .load()
                    .iter()
                    .map(|v| (Carried::AdminToken, v.clone())),
            )
            .collect();
        self.scan.store(Arc::new(ScanSet::new(values)));
    }

    /// Looks at slot `idx`'s `file:` source: a file whose stamp changed (or that could not be
    /// read last time) is read again. Blocking I/O: its watcher runs it off the runtime, so a
    /// hung mount stalls only that watcher, never a request.
    fn check_file(&self, idx: usize) {
        let Some(slot) = self.slots.get(idx) else {
            return;
        };
        let (SecretSource::File(path), Some(old)) = (&slot.source, slot.cache.load_full()) else {
            return;
        };
        let stamp = FileStamp::of(path);
        // A file that could not be read is tried again (every other check), changed or not:
        // fixing its owner or mode does not always change what the stamp holds.
        if stamp.is_some() && stamp == old.stamp && old.value.is_some() {
            return;
        }
        // SECURITY: a change is read once the file has stayed as it is for a whole check, and
        // only if it did not change while it was read. A writer that rewrites the file in
        // place in pieces (`>` then writes, an editor, `tee`) would otherwise have its first
        // piece injected as the credential for a second, and that piece would take the
        // previous value's place in the egress scan. The old value serves meanwhile.
        {
            let Ok(mut settling) = slot.settling.lock() else {
                return;
            };
            if *settling != Some(stamp) {
                *settling = Some(stamp);
                return;
            }
            *settling = None;
        }
        let read = read_file(path);
        if FileStamp::of(path) != stamp {
            return;
        }
        let value = match read {
            Ok(v) => Some(Arc::new(CredentialValue::new(v))),
            Err(why) => {
                if old.value.is_some() {
                    tracing::warn!(credential = %slot.name, %why, "credential cannot be read any more; requests that need it get 502 credential_unavailable");
                }
                None
            }
        };
        if value.is_none() && old.value.is_none() && stamp == old.stamp {
            return;
        }
        let cached = Cached {
            value,
            retired: None,
            stale: false,
            stamp,
        };
        self.store(idx, cached);
    }

    /// Every slot's `check_file`, at once (the watchers' work at one tick, for tests).
    #[cfg(test)]
    fn check_files(&self) {
        for idx in 0..self.slots.len() {
            self.check_file(idx);
        }
    }

    /// Two ticks: a change that stays is read at the second.
    #[cfg(test)]
    fn settle_files(&self) {
        self.check_files();
        self.check_files();
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
                    settling: std::sync::Mutex::new(None),
                })
                .collect(),
            scan: ArcSwap::from_pointee(ScanSet::new(
                own.iter()
                    .map(|v| (Carried::AdminToken, v.clone()))
                    .collect(),
            )),
            rebuild: std::sync::Mutex::new(()),
            own: ArcSwap::from_pointee(own),
        };
        for (idx, def) in defs.iter().enumerate() {
            // Taken before the read (a change during it is seen at the next check), and off
            // the runtime like the read itself.
            let stamp = match &def.source {
                SecretSource::File(path) => {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || FileStamp::of(&path))
                        .await
                        .ok()
                        .flatten()
                }
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

    /// Starts background refresh: one task per `exec` source, and one that looks at every
    /// `file:` source once a second. They end when the store is dropped. After a failed
    /// attempt (or with no value yet) an `exec` is run again sooner than its `refresh`.
    pub fn spawn_refreshers(&self) {
        for (idx, slot) in self.inner.slots.iter().enumerate() {
            if !matches!(slot.source, SecretSource::File(_)) {
                continue;
            }
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(FILE_CHECK_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    // One check of a file at a time, each file on its own: a check stuck on a
                    // hung mount is not stacked on, and holds up no other file.
                    if tokio::task::spawn_blocking(move || inner.check_file(idx))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
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
                            stamp: None,
                        },
                    );
                }
            });
        }
    }

    /// The current value of credential `idx`, or `None` if it cannot be read now.
    pub fn get(&self, idx: usize) -> Option<Arc<CredentialValue>> {
        let slot = self.inner.slots.get(idx)?;
        slot.cache.load().as_ref().and_then(|c| c.value.clone())
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

    /// Whose values, if any, the method, a header (name or value), the request target or its
    /// authority carries (SPEC §4.3 `secret_egress`), raw, percent-encoded or base64-encoded:
    /// every credential's, the admin token, a task token of `tasks`; empty when none. For
    /// requests and for CONNECT alike (whose target is its authority). `Proxy-Authorization`
    /// is scanned too unless it authenticated this request (`proxy_auth_used`): one that failed
    /// (an agent trying the admin token or a credential as its task token has it in hand), or
    /// one inside a tunnel (which the tunnel's CONNECT authenticated), which keyward drops.
    pub fn carried_by(
        &self,
        method: &http::Method,
        uri: &Uri,
        headers: &http::HeaderMap,
        tasks: &crate::tasks::TaskStore,
        proxy_auth_used: bool,
    ) -> Vec<Carried> {
        let target = uri
            .path_and_query()
            .map(|p| p.as_str().as_bytes())
            .unwrap_or(b"");
        let mut places: Vec<&[u8]> = vec![target, method.as_str().as_bytes()];
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
        let (exact, folded) = (Places::new(&places, false), Places::new(&folded, true));
        let mut found = self.scan_places(&exact, &folded, false);
        // SECURITY: a task token (the agent's own, say) is keyward's secret too: whoever
        // reads it where it was sent could use the task through keyward.
        if [&exact, &folded]
            .iter()
            .any(|p| p.hay.iter().any(|h| tasks.knows_token_in(h)))
        {
            found.push(Carried::TaskToken);
        }
        if !proxy_auth_used {
            // Not for a task token: one there is in its place (a revoked task's, the right
            // token under another task's id, a client that sends it inside the tunnel too).
            let auth: Vec<&[u8]> = headers
                .get_all(http::header::PROXY_AUTHORIZATION)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            let auth = Places::new(&auth, false);
            for owner in self.scan_places(&auth, &Places::new(&[], true), false) {
                if !found.contains(&owner) {
                    found.push(owner);
                }
            }
        }
        found
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
        let (exact, folded) = (Places::new(exact, false), Places::new(folded, true));
        !self.scan_places(&exact, &folded, true).is_empty()
    }

    /// Whose values `exact` and `folded` hold: every owner once (a rotated credential's two
    /// values are one), or only the first found (`first`).
    fn scan_places(&self, exact: &Places<'_>, folded: &Places<'_>, first: bool) -> Vec<Carried> {
        let set = self.inner.scan.load();
        let mut found: Vec<Carried> = Vec::new();
        if !set.may_start_in(exact) && !set.may_start_in(folded) {
            return found;
        }
        for (owner, value) in set.values.iter() {
            if found.contains(owner) {
                continue;
            }
            if exact.contain(value.secret.expose().as_bytes()) || folded.contain(&value.folded) {
                found.push(owner.clone());
                if first {
                    break;
                }
            }
        }
        found
    }
}

/// Whose value a request carried (`carried_by`): named in its audit record and log line, so
/// the operator rotates the secret that leaked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carried {
    /// A policy credential (its current value, or the one before its last rotation).
    Credential(String),
    /// keyward's admin token: whoever holds it can mint any task.
    AdminToken,
    /// The token of a task keyward knows (tokens are kept only as hashes).
    TaskToken,
}

impl Carried {
    /// The record's `credential` field: the policy's name, or `(admin token)` or `(task
    /// token)`, which no policy name can be (names start with a letter or digit).
    pub fn name(&self) -> &str {
        match self {
            Carried::Credential(name) => name,
            Carried::AdminToken => "(admin token)",
            Carried::TaskToken => "(task token)",
        }
    }
}
/// Every readable credential value of a store, and the first `MIN_SCAN_LEN` bytes of each
/// (as is and lowercased) hashed into a 2^16-bit filter: a request none of whose windows hits
/// the filter carries no value, which is decided without looking at any value. With 50 values
/// about one request in twenty with 100 windows goes on to the exact search.
struct ScanSet {
    values: Vec<(Carried, Arc<CredentialValue>)>,
    firsts: Box<[u64; 1024]>,
}

impl ScanSet {
    fn new(values: Vec<(Carried, Arc<CredentialValue>)>) -> ScanSet {
        let mut firsts = Box::new([0u64; 1024]);
        let needles = values
            .iter()
            .flat_map(|(_, v)| [v.secret.expose().as_bytes(), v.folded.as_slice()]);
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

/// When an `exec` source is first run again: after `refresh`, or sooner when the read at load
/// failed (no value, or one kept from before a reload).
fn first_refresh(cached: Option<&Cached>, every: Duration) -> Duration {
    match cached {
        Some(c) if c.value.is_some() && !c.stale => every,
        _ => every.min(EXEC_RETRY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    // A value of two lines could not go into a header: refused at start and at a rotation
    // alike (the rotated file is read by the watcher, not by `read_source`).
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
        store.inner.settle_files();
        assert!(store.get(0).is_none(), "a two-line value was taken");
    }

    /// A file rewritten in place in pieces: what the first check sees (the first piece) is
    /// not taken; the file is read once it has stayed as it is for a check.
    #[test]
    fn a_file_rewritten_in_pieces_is_read_once_it_has_settled() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "sk_live_the_old_value_0123\n").unwrap();
        let store = file_store(&[&path]);
        let value = || store.get(0).map(|v| v.secret().expose().to_string());
        let mut file = std::fs::File::options()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(b"sk_live_new_").unwrap();
        store.inner.check_files();
        assert_eq!(
            value().as_deref(),
            Some("sk_live_the_old_value_0123"),
            "a piece was taken"
        );
        // The writer goes on before the next check: still not read.
        file.write_all(b"value_4567").unwrap();
        store.inner.check_files();
        assert_eq!(value().as_deref(), Some("sk_live_the_old_value_0123"));
        // Done: read at the next check, and the old value is still looked for on egress.
        file.write_all(b"89\n").unwrap();
        store.inner.settle_files();
        assert_eq!(value().as_deref(), Some("sk_live_new_value_456789"));
        assert!(store.carried_in(&[b"Bearer sk_live_the_old_value_0123"]));
        // A file that is gone is noticed the same way: after a check it stays gone.
        std::fs::remove_file(&path).unwrap();
        store.inner.check_files();
        assert!(value().is_some());
        store.inner.check_files();
        assert!(value().is_none());
    }

    #[test]
    fn the_scan_filter_never_misses_a_present_secret() {
        let secret = "sk_live_0123456789abcdef";
        let set = ScanSet::new(vec![(
            Carried::AdminToken,
            Arc::new(CredentialValue::new(Secret::new(secret.into()))),
        )]);
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
                    settling: std::sync::Mutex::new(None),
                })
                .collect(),
            scan: ArcSwap::from_pointee(ScanSet::new(Vec::new())),
            rebuild: std::sync::Mutex::new(()),
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

        // The file changes (as a Kubernetes secret volume does); the next check reads it, and
        // the scan finds the new value. The old one is still looked
        // for (an upstream may accept it for a while yet), until the next rotation.
        let rotate = |value: &str, ahead: u64| {
            std::fs::write(&a, value).unwrap();
            let later = std::time::SystemTime::now() + Duration::from_secs(ahead);
            let file = std::fs::File::options().write(true).open(&a).unwrap();
            file.set_modified(later).unwrap();
            store.inner.settle_files();
        };
        rotate("sk_live_rotated_value_C", 5);
        assert!(store.carried_in(&[b"/x?k=sk_live_rotated_value_C"]));
        assert!(store.carried_in(&[b"/x?k=sk_live_first_value_A"]));
        // Either value is named as the credential it belongs to, the one to rotate again.
        // Each once, however many of its values are there.
        let tasks = crate::tasks::TaskStore::new();
        let carried = |q: &str| {
            let uri = format!("/x?{q}").parse::<Uri>().unwrap();
            store.carried_by(
                &http::Method::GET,
                &uri,
                &http::HeaderMap::new(),
                &tasks,
                true,
            )
        };
        let named = |names: &[&str]| -> Vec<Carried> {
            names
                .iter()
                .map(|n| Carried::Credential(n.to_string()))
                .collect()
        };
        assert_eq!(carried("k=sk_live_first_value_A"), named(&["c0"]));
        assert_eq!(carried("k=ghp_second_value_BBBB"), named(&["c1"]));
        assert_eq!(
            carried("a=ghp_second_value_BBBB&b=sk_live_first_value_A&c=sk_live_rotated_value_C"),
            named(&["c0", "c1"])
        );
        assert_eq!(carried("k=nothing_secret_here"), vec![]);
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
        store.inner.settle_files();
        assert!(store.carried_in(&[b"Bearer sk_live_after_rotation_"]));
        assert_eq!(
            store.get(0).unwrap().secret().expose(),
            "sk_live_after_rotation_"
        );
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

    // A command that failed at a reload and left the value from before is run again soon,
    // not after a whole `refresh` (an operator who rotated during an outage waits 30 s).
    #[test]
    fn a_failed_or_kept_exec_value_is_retried_before_its_refresh() {
        let every = Duration::from_secs(600);
        let cached = |value: bool, stale: bool| Cached {
            value: value.then(|| Arc::new(CredentialValue::new(Secret::new("sk_x_1234".into())))),
            retired: None,
            stale,
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
}
