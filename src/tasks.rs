//! Tasks: minting, token verification, expiry, revocation and request budgets (SPEC §2, §4.1, §5).
//!
//! Tokens are `kw_` + 256 random bits, handed out once and stored only as SHA-256 hashes; a
//! presented token is hashed and compared in constant time. This module never logs or returns a
//! token after minting, and never decides routes — `decide` does, reading a `Task`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use dashmap::DashMap;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::policy::CompiledPolicy;
use crate::reason::Reason;
use crate::secret::Secret;

/// Longest `Proxy-Authorization` value we look at; anything longer is an invalid token.
const MAX_PROXY_AUTH_LEN: usize = 1024;
/// Longest task id accepted at mint time.
const MAX_TASK_ID_LEN: usize = 128;
/// Revoked and expired tasks are remembered this long (less when the store is full), so agents
/// get the precise reason.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Constraint values one task may hold in all, and their bytes.
pub const MAX_CONSTRAINT_VALUES: usize = 4096;
pub const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;
/// A full store looks for ended tasks to forget at most this often (a scan of every task).
const FULL_SWEEP_EVERY_MS: u64 = 1000;
/// `t` cut down to a whole millisecond since the epoch.
fn whole_millis(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    t - Duration::from_nanos(u64::from(since.subsec_nanos() % 1_000_000))
}

/// Default ttl when the mint request names none (capped by the agent's `max_ttl`).
const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// Intents longer than this get a name index (`Task::grant`); shorter ones are searched in
/// order, which is faster than hashing the name.
const GRANT_INDEX_FROM: usize = 16;

/// One capability of a task's intent, optionally narrowed by path-parameter constraints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub capability: String,
    /// param name → allowed values (exact, case-sensitive).
    pub constraints: Vec<(String, Vec<String>)>,
}

/// One run of an agent. Identity fields are immutable; validity is read on every request.
#[derive(Debug)]
pub struct Task {
    pub id: String,
    pub agent: String,
    pub intent: Vec<Grant>,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub max_requests: Option<u64>,
    /// Unique for the life of the process (an id may be minted again once it is forgotten):
    /// upstream HTTP/1 connections are reused by the task that opened them only.
    pub serial: u64,
    /// Capability name → position of its first grant in `intent`, for long intents.
    /// foldhash: the names were checked against the policy at mint time.
    grant_index: Option<HashMap<Box<str>, usize, foldhash::fast::RandomState>>,
    token_hash: [u8; 32],
    used: AtomicU64,
    denied: AtomicU64,
    revoked: AtomicBool,
    /// When it was revoked or withdrawn: it is forgotten an hour after, not an hour after the
    /// expiry it will never reach.
    revoked_at: std::sync::OnceLock<SystemTime>,
    /// Revoked by an operator (not withdrawn by a reload): responses still streaming end too.
    cut: AtomicBool,
    /// Woken when the task is revoked or withdrawn, so the tunnels and relays still open for
    /// it end at once.
    revocation: tokio::sync::Notify,
    in_flight: AtomicU32,
    /// Agent connections this task holds (`proxy.max_task_connections`).
    connections: AtomicU32,
    /// Agent connections all the tasks of its agent hold (`proxy.max_agent_connections`):
    /// one counter per agent, shared by its tasks (`TaskStore::agents`).
    agent_connections: Arc<AtomicU32>,
    /// Denial pacing (`pace_denial`): when the next denial may go out unpaced, in µs since
    /// `PACING_EPOCH` (GCRA's theoretical arrival time), and the denials waiting now.
    denial_due_us: AtomicU64,
    denials_waiting: AtomicU32,
}

/// How a denial of a task goes out (`Task::pace_denial`).
pub enum DenialPace {
    /// At once: the task is within its denial rate.
    Now,
    /// After this wait, holding the guard (one of the task's waiting denials) meanwhile.
    Wait(Duration, PacedDenial),
    /// At once, closing the connection: the task already has as many denials waiting as it
    /// may, so each further one costs it a new connection.
    Flooding,
}

/// One of a task's denials waiting out its pace.
pub struct PacedDenial(Arc<Task>);

impl Drop for PacedDenial {
    fn drop(&mut self) {
        self.0.denials_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

static PACING_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Why a task stopped being valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskEnd {
    Revoked,
    Expired,
}

impl TaskEnd {
    /// The word audit records use (`outcome`) for what the end cut short.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEnd::Revoked => "task_revoked",
            TaskEnd::Expired => "task_expired",
        }
    }
}

impl Task {
    /// SECURITY (I7): paces the task's denials to `per_second` (a second's worth at once),
    /// with at most `max_waiting` waiting. Every request leaves an audit record, and a refused
    /// one costs the agent nothing else, so an agent refused in a loop (pipelined, over many
    /// connections or HTTP/2 streams) could write tens of MB of audit log a second, fill its
    /// disk, and so stop keyward for every task (no record, no request).
    pub fn pace_denial(self: &Arc<Self>, per_second: u32, max_waiting: u32) -> DenialPace {
        let epoch = *PACING_EPOCH.get_or_init(Instant::now);
        let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.pace_denial_at(now, per_second, max_waiting)
    }

    /// `pace_denial` at `now` (µs since `PACING_EPOCH`): a generic cell rate algorithm, whose
    /// one atomic is when the next denial is due.
    fn pace_denial_at(self: &Arc<Self>, now: u64, per_second: u32, max_waiting: u32) -> DenialPace {
        let interval = 1_000_000 / u64::from(per_second.max(1));
        let burst = 1_000_000u64;
        let mut due = self.denial_due_us.load(Ordering::Acquire);
        loop {
            let next = due.max(now).saturating_add(interval);
            let wait = next.saturating_sub(now).saturating_sub(burst);
            // A denial that would wait takes its place among the waiting first, so that
            // denials on several threads at once cannot all find one free.
            let waiting = if wait > 0 {
                let previous = self.denials_waiting.fetch_add(1, Ordering::AcqRel);
                let guard = PacedDenial(Arc::clone(self));
                if previous >= max_waiting {
                    return DenialPace::Flooding; // (the guard's drop gives the place back)
                }
                Some(guard)
            } else {
                None
            };
            match self.denial_due_us.compare_exchange_weak(
                due,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return match waiting {
                        None => DenialPace::Now,
                        Some(guard) => DenialPace::Wait(Duration::from_micros(wait), guard),
                    }
                }
                Err(seen) => due = seen,
            }
        }
    }

    /// The grant of `capability` in the intent (the first, should it be named twice).
    pub fn grant(&self, capability: &str) -> Option<&Grant> {
        match &self.grant_index {
            Some(index) => index.get(capability).and_then(|&i| self.intent.get(i)),
            None => self.intent.iter().find(|g| g.capability == capability),
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at
    }

    /// Whether the task has ended (revoked, or expired at `now`).
    pub fn ended_at(&self, now: SystemTime) -> Option<TaskEnd> {
        if self.is_revoked() {
            Some(TaskEnd::Revoked)
        } else if self.is_expired(now) {
            Some(TaskEnd::Expired)
        } else {
            None
        }
    }

    /// Whether a response still streaming for this task must stop now: the task was revoked
    /// by an operator, or expired. A task a reload withdrew lets the requests it already had in
    /// flight finish (SPEC §9: they finish under the policy they started with).
    pub fn cut_at(&self, now: SystemTime) -> Option<TaskEnd> {
        if self.cut.load(Ordering::Acquire) {
            Some(TaskEnd::Revoked)
        } else if self.is_expired(now) {
            Some(TaskEnd::Expired)
        } else {
            None
        }
    }

    /// Completes when the task is revoked or expires: tunnels, WebSocket relays and
    /// intercepted connections opened for it end then, not at their next request.
    pub async fn ended(&self) -> TaskEnd {
        self.until(Task::ended_at).await
    }

    /// Completes when what the task has in flight must stop (`cut_at`): an operator revoked
    /// it, or it expired. A reload's withdrawal alone does not complete it.
    pub async fn cut(&self) -> TaskEnd {
        self.until(Task::cut_at).await
    }

    /// Completes when `end` says the task ended: looked at on every revocation (a withdrawal
    /// wakes it too) and at the expiry.
    async fn until(&self, end: fn(&Task, SystemTime) -> Option<TaskEnd>) -> TaskEnd {
        loop {
            let revoked = self.revocation.notified();
            tokio::pin!(revoked);
            // Registered before the flags are read, so a revocation in between is not missed.
            revoked.as_mut().enable();
            if let Some(ended) = end(self, SystemTime::now()) {
                return ended;
            }
            let left = self
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                _ = revoked => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }

    /// Completes when an operator revokes the task (not when a reload withdraws it: its
    /// requests in flight finish). No timer: a request waiting on its upstream awaits this
    /// beside the upstream, and the timer wheel would cost every request.
    pub async fn revoked_by_operator(&self) {
        let notified = self.revocation.notified();
        tokio::pin!(notified);
        loop {
            // Registered before the flag is read, so a revocation in between is not missed.
            notified.as_mut().enable();
            if self.cut.load(Ordering::Acquire) {
                return;
            }
            notified.as_mut().await;
            notified.set(self.revocation.notified());
        }
    }

    pub fn requests_used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn requests_denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    pub fn count_denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives back a request taken by `try_consume` that was refused after all (e.g. the
    /// upstream address was blocked): only allowed requests count.
    pub fn refund(&self) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Takes one of the task's `limit` places for a request in flight, held until the returned
    /// slot drops (the response is over); `None` when all are taken.
    pub fn enter(self: &Arc<Self>, limit: u32) -> Option<InFlightSlot> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(InFlightSlot(self.clone()))
    }

    /// Takes one of the task's `limit` connection places, held until the returned guard drops
    /// (the connection, and every tunnel or relay it became, has closed); `None` when all are
    /// taken.
    pub fn hold_connection(
        self: &Arc<Self>,
        task_limit: u32,
        agent_limit: u32,
    ) -> Result<ConnectionHold, ConnectionsFull> {
        let take = |count: &AtomicU32, limit: u32| {
            count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok()
        };
        if !take(&self.connections, task_limit) {
            return Err(ConnectionsFull::Task);
        }
        if !take(&self.agent_connections, agent_limit) {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnectionsFull::Agent);
        }
        Ok(ConnectionHold(self.clone()))
    }

    /// Agent connections this task holds now.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// Requests of this task in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether the request budget (`max_requests`) is used up.
    pub fn budget_spent(&self) -> bool {
        self.max_requests
            .is_some_and(|max| self.used.load(Ordering::Acquire) >= max)
    }

    /// Takes one request from the budget; false when it is spent. Exact under concurrency.
    pub fn try_consume(&self) -> bool {
        match self.max_requests {
            None => {
                self.used.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(max) => self
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }
}

/// One request of a task in flight (see `Task::enter`).
pub struct InFlightSlot(Arc<Task>);

impl InFlightSlot {
    pub fn task(&self) -> &Task {
        &self.0
    }

    pub fn shared_task(&self) -> Arc<Task> {
        self.0.clone()
    }
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of a task's connection places (see `Task::hold_connection`).
pub struct ConnectionHold(Arc<Task>);

impl ConnectionHold {
    pub fn task(&self) -> &Arc<Task> {
        &self.0
    }
}

impl Drop for ConnectionHold {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.agent_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whose connection places are all held: the task's (`max_task_connections`) or its agent's
/// (`max_agent_connections`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionsFull {
    Task,
    Agent,
}

/// What a mint request asks for (from the admin API or `keyward explain`).
#[derive(Clone, Debug)]
pub struct MintSpec {
    pub agent: String,
    pub task: Option<String>,
    pub intent: Vec<Grant>,
    pub ttl: Option<Duration>,
    pub max_requests: Option<u64>,
}

/// Why a mint request is refused; `Display` is the message returned to the admin client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    #[error("unknown agent `{0}`")]
    UnknownAgent(String),
    #[error("unknown capability `{0}`")]
    UnknownCapability(String),
    #[error("agent `{agent}` is not granted capability `{capability}`")]
    NotGranted { agent: String, capability: String },
    #[error("capability `{capability}` has no route with parameter `{param}`")]
    UnknownParam { capability: String, param: String },
    /// The intent-wide `where` names a parameter no capability of the intent has.
    #[error("no capability of the intent has a route with parameter `{0}`")]
    UnknownIntentParam(String),
    #[error("constraint on `{0}` lists no values, or an empty one")]
    EmptyConstraint(String),
    #[error("the intent's constraints list {0} values, or {1} bytes, in all (the intent-wide `where` counts once per capability); at most {MAX_CONSTRAINT_VALUES} values and {MAX_CONSTRAINT_BYTES} bytes are allowed")]
    TooManyConstraintValues(usize, usize),
    #[error("the intent names no capability")]
    EmptyIntent,
    #[error("capability `{0}` appears twice in the intent")]
    DuplicateCapability(String),
    #[error("capability `{capability}` constrains `{param}` twice (in its own `where` and the intent-wide one, or twice in one)")]
    DuplicateConstraint { capability: String, param: String },
    /// Shown in seconds to the millisecond (`3600.001s`: a `1h1ms` is over an hour).
    #[error("ttl {} exceeds agent `{agent}`'s max_ttl of {}", seconds(*.requested_ms), seconds(*.max_ms))]
    TtlTooLong {
        agent: String,
        requested_ms: u64,
        max_ms: u64,
    },
    #[error("ttl must be at least 1s")]
    TtlTooShort,
    #[error("constraint `{param}` of capability `{capability}` has a value with `/`, which one path segment never holds")]
    UnmatchableConstraint { capability: String, param: String },
    #[error("constraint `{param}` of capability `{capability}` has a value with a control character, which keyward refuses in every path")]
    ControlInConstraint { capability: String, param: String },
    #[error("constraint `{param}` of capability `{capability}` has a value no request path holds as written ({why}): write it as a URL spells it (non-ASCII and spaces percent-encoded)")]
    NonCanonicalConstraint {
        capability: String,
        param: String,
        why: &'static str,
    },
    #[error("max_requests must be at least 1")]
    ZeroBudget,
    #[error("task id must be 1-128 characters of A-Z a-z 0-9 . _ -, and not `.` or `..`")]
    BadTaskId,
    #[error("task id `{0}` is in use")]
    Conflict(String),
    #[error("keyward holds {0} tasks, as many as `admin.max_tasks` allows; revoke tasks or wait for some to end")]
    TooMany(usize),
}

/// A constraint value as a request path's capture holds it (percent-encoded unreserved
/// characters decoded, other triplets in upper case), or why no path holds it.
fn canonical_value(value: &str) -> Result<String, crate::matcher::canon::Ambiguity> {
    // As a path, `?` or `#` would end the value there: `web?x` would be held as `web`.
    if value.contains(['?', '#']) {
        return Err(crate::matcher::canon::Ambiguity::EncodedDelimiter);
    }
    let path = crate::matcher::canon::canonicalize(&format!("/{value}"))?;
    Ok(path.tail(0).to_owned())
}

/// Why no request path holds `value` as written, in the words of a deny detail; a raw space
/// (which a path refuses with the control bytes) is named as such.
fn why_not_canonical(value: &str) -> Option<&'static str> {
    let why = canonical_value(value).err()?;
    Some(match why {
        crate::matcher::canon::Ambiguity::ControlByte
            if value.contains(' ') && !value.bytes().any(|b| b < 0x20 || b == 0x7f) =>
        {
            "space"
        }
        _ => why.as_str(),
    })
}

/// How the agent presented itself on `Proxy-Authorization`.
enum Presented<'a> {
    Basic { task: &'a str, token: &'a str },
    Bearer(&'a str),
}

/// All live (and recently ended) tasks. Lock-free reads: a sharded map by id and by token hash.
pub struct TaskStore {
    by_id: DashMap<String, Arc<Task>>,
    by_hash: DashMap<[u8; 32], Arc<Task>>,
    /// Each agent's connection count, shared by its tasks (agents are the policy's names, so
    /// this stays small).
    agents: DashMap<String, Arc<AtomicU32>>,
    /// Tasks held at most (`admin.max_tasks`). Concurrent mints may pass it by a few.
    limit: usize,
    /// When a full store last looked for ended tasks (ms since the Unix epoch), and whether a
    /// task was revoked or withdrawn since.
    last_sweep_ms: AtomicU64,
    ended_since_sweep: AtomicBool,
}

impl Default for TaskStore {
    fn default() -> Self {
        Self::with_limit(crate::policy::AdminSettings::DEFAULT_MAX_TASKS)
    }
}

impl TaskStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_limit(limit: usize) -> Self {
        TaskStore {
            by_id: DashMap::new(),
            by_hash: DashMap::new(),
            agents: DashMap::new(),
            limit,
            last_sweep_ms: AtomicU64::new(0),
            ended_since_sweep: AtomicBool::new(false),
        }
    }

    /// Validates `spec` against the current policy and stores a new task. Returns the task and
    /// its token — the only time the token exists outside the agent.
    pub fn mint(
        &self,
        policy: &CompiledPolicy,
        spec: MintSpec,
        now: SystemTime,
    ) -> Result<(Arc<Task>, Secret), MintError> {
        let task = build_task(policy, spec, now)?;
        if self.by_id.contains_key(&task.id) {
            return Err(MintError::Conflict(task.id));
        }
        if self.by_id.len() >= self.limit {
            // Ended tasks are only kept to be listed: forgotten now rather than in an hour,
            // before a live one is refused. Only once a task was revoked since the last look,
            // or a second on (for expiries): the scan write-locks every shard the requests'
            // authentication reads, so a minting loop against a store full of live tasks must
            // not repeat it.
            let now_ms = u64::try_from(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(u64::MAX);
            let last = self.last_sweep_ms.load(Ordering::Relaxed);
            let due = self.ended_since_sweep.swap(false, Ordering::Relaxed)
                || now_ms.saturating_sub(last) >= FULL_SWEEP_EVERY_MS;
            if due
                && self
                    .last_sweep_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.forget(|t| t.ended_at(now).is_some());
            }
            if self.by_id.len() >= self.limit {
                return Err(MintError::TooMany(self.limit));
            }
        }
        let token = new_token();
        let hash = hash_token(token.expose());
        let agent_connections = self.agents.entry(task.agent.clone()).or_default().clone();
        let task = Arc::new(Task {
            token_hash: hash,
            agent_connections,
            ..task
        });
        match self.by_id.entry(task.id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(_) => {
                return Err(MintError::Conflict(task.id.clone()))
            }
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(task.clone());
            }
        }
        self.by_hash.insert(hash, task.clone());
        Ok((task, token))
    }

    /// Identifies the task behind a request's `Proxy-Authorization`. Every malformed, unknown or
    /// mismatched form answers the same `InvalidToken`, so the answer is no oracle. Validity
    /// (expiry, revocation) is left to `decide`, which sees `now`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Task>, Reason> {
        let mut values = headers.get_all(http::header::PROXY_AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(Reason::MissingCredentials);
        };
        // SECURITY: two credentials on one request could be read differently by two parsers.
        if values.next().is_some() || value.len() > MAX_PROXY_AUTH_LEN {
            return Err(Reason::InvalidToken);
        }
        let value = value.to_str().map_err(|_| Reason::InvalidToken)?;
        let decoded;
        let presented = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => {
                decoded = STANDARD
                    .decode(rest.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .map(Secret::new)
                    .ok_or(Reason::InvalidToken)?;
                let (task, token) = decoded
                    .expose()
                    .split_once(':')
                    .ok_or(Reason::InvalidToken)?;
                Presented::Basic { task, token }
            }
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
                Presented::Bearer(rest.trim())
            }
            _ => return Err(Reason::InvalidToken),
        };
        self.verify(presented).ok_or(Reason::InvalidToken)
    }

    fn verify(&self, presented: Presented<'_>) -> Option<Arc<Task>> {
        match presented {
            Presented::Basic { task, token } => {
                let hash = hash_token(token);
                let found = self.by_id.get(task).map(|t| t.value().clone());
                // SECURITY: compare even when the id is unknown, so timing tells nothing.
                let expected = found.as_ref().map_or([0u8; 32], |t| t.token_hash);
                let equal: bool = expected.ct_eq(&hash).into();
                found.filter(|_| equal)
            }
            Presented::Bearer(token) => {
                let hash = hash_token(token);
                let found = self.by_hash.get(&hash).map(|t| t.value().clone())?;
                let equal: bool = found.token_hash.ct_eq(&hash).into();
                equal.then_some(found)
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Task>> {
        self.by_id.get(id).map(|t| t.value().clone())
    }

    /// Whether `bytes` (as they are: callers decode) hold the token of a task this store
    /// knows. Shaped like one (`kw_` and 43 token characters) is not enough: random base64
    /// (a JWT's signature) and snake_case names (`peak_kw_…`) take that shape too.
    pub fn knows_token_in(&self, bytes: &[u8]) -> bool {
        if bytes.len() < 3 + TOKEN_BODY_LEN {
            // Most header values: too short to hold one.
            return false;
        }
        // Built once: a searcher's set-up costs more than a search through a header value.
        static PREFIX: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
            std::sync::OnceLock::new();
        let prefix = PREFIX.get_or_init(|| memchr::memmem::Finder::new(b"kw_"));
        let is_token_byte = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
        prefix.find_iter(bytes).any(|at| {
            let Some(candidate) = bytes.get(at..at + 3 + TOKEN_BODY_LEN) else {
                return false;
            };
            candidate[3..].iter().all(is_token_byte)
                && std::str::from_utf8(candidate)
                    .is_ok_and(|token| self.by_hash.contains_key(&hash_token(token)))
        })
    }

    /// All tasks, sorted by id.
    pub fn list(&self) -> Vec<Arc<Task>> {
        let mut all: Vec<_> = self.by_id.iter().map(|t| t.value().clone()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Revokes at once (an operator's `DELETE`): the next request of any connection holding
    /// this task is refused, and responses still streaming for it stop.
    pub fn revoke(&self, id: &str) -> Option<Arc<Task>> {
        let task = self.get(id)?;
        task.cut.store(true, Ordering::Release);
        // A task that has expired already ended, and stays expired (status and reason); what
        // it still has in flight is cut all the same.
        if task.is_expired(SystemTime::now()) {
            task.revocation.notify_waiters();
            return Some(task);
        }
        self.end(task)
    }

    /// Withdraws a task a reloaded policy no longer allows: refused from its next request on,
    /// for good, while the requests it has in flight finish. Its tunnels and WebSocket relays
    /// end now: they are open channels, not requests, and could otherwise outlive the policy.
    pub fn withdraw(&self, task: &Arc<Task>) {
        // The task itself, not its id: the id may name a newer task by now.
        self.end(Arc::clone(task));
    }

    fn end(&self, task: Arc<Task>) -> Option<Arc<Task>> {
        let _ = task.revoked_at.set(SystemTime::now());
        self.ended_since_sweep.store(true, Ordering::Relaxed);
        task.revoked.store(true, Ordering::Release);
        task.revocation.notify_waiters();
        Some(task)
    }

    /// Number of live (unexpired, unrevoked) tasks per agent, for the `keyward_tasks_active` gauge.
    pub fn active_by_agent(&self, now: SystemTime) -> BTreeMap<String, i64> {
        let mut counts = BTreeMap::new();
        for t in self.by_id.iter() {
            if !t.is_revoked() && !t.is_expired(now) {
                *counts.entry(t.agent.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Forgets tasks that ended (expired, or were revoked) more than an hour ago; called
    /// periodically.
    pub fn purge(&self, now: SystemTime) {
        self.forget(|t| {
            let ended = t
                .revoked_at
                .get()
                .map_or(t.expires_at, |r| (*r).min(t.expires_at));
            ended + FORGET_AFTER <= now
        });
    }

    fn forget(&self, dead: impl Fn(&Task) -> bool) {
        self.by_id.retain(|_, t| !dead(t));
        self.by_hash.retain(|_, t| !dead(t));
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Checks the spec against the policy and builds the task (without its token hash yet).
fn build_task(
    policy: &CompiledPolicy,
    mut spec: MintSpec,
    now: SystemTime,
) -> Result<Task, MintError> {
    let agent = policy
        .agent(&spec.agent)
        .ok_or_else(|| MintError::UnknownAgent(spec.agent.clone()))?;
    if spec.intent.is_empty() {
        return Err(MintError::EmptyIntent);
    }
    let own: Vec<&(String, Vec<String>)> =
        spec.intent.iter().flat_map(|g| &g.constraints).collect();
    check_constraint_size(&own)?;
    for (i, grant) in spec.intent.iter().enumerate() {
        let (cap_idx, cap) = policy
            .capability(&grant.capability)
            .ok_or_else(|| MintError::UnknownCapability(grant.capability.clone()))?;
        // SECURITY: two entries for one capability (or two constraints on one parameter) would
        // show one thing in the task listing and enforce another; refuse instead of choosing.
        if spec
            .intent
            .iter()
            .take(i)
            .any(|g| g.capability == grant.capability)
        {
            return Err(MintError::DuplicateCapability(cap.name.clone()));
        }
        for (j, (param, _)) in grant.constraints.iter().enumerate() {
            if grant.constraints.iter().take(j).any(|(p, _)| p == param) {
                return Err(MintError::DuplicateConstraint {
                    capability: cap.name.clone(),
                    param: param.clone(),
                });
            }
        }
        if !agent.capabilities.contains(&cap_idx) {
            return Err(MintError::NotGranted {
                agent: agent.name.clone(),
                capability: cap.name.clone(),
            });
        }
        for (param, values) in &grant.constraints {
            // An empty value can never match a path segment: a mistake, not a constraint.
            if values.is_empty() || values.iter().any(String::is_empty) {
                return Err(MintError::EmptyConstraint(param.clone()));
            }
            let known = cap
                .routes
                .iter()
                .any(|r| r.param_names().any(|p| p == param));
            if !known {
                return Err(MintError::UnknownParam {
                    capability: cap.name.clone(),
                    param: param.clone(),
                });
            }
            // A control byte (NUL, CR, …) is refused in every path, so such a value would never
            // match; it is a mistake, or an attempt to smuggle one into a log or an approval.
            if values.iter().any(|v| v.chars().any(char::is_control)) {
                return Err(MintError::ControlInConstraint {
                    capability: cap.name.clone(),
                    param: param.clone(),
                });
            }
            // A `{param}` captures one segment; only a `{*param}` can hold a `/`.
            let spans_segments = cap.routes.iter().any(|r| r.rest_param() == Some(param));
            if !spans_segments && values.iter().any(|v| v.contains('/')) {
                return Err(MintError::UnmatchableConstraint {
                    capability: cap.name.clone(),
                    param: param.clone(),
                });
            }
            // A value a request path could not hold as written (`é` raw, a space, `..`) would
            // be minted and then never match: said now, with why.
            if let Some(why) = values.iter().find_map(|v| why_not_canonical(v)) {
                return Err(MintError::NonCanonicalConstraint {
                    capability: cap.name.clone(),
                    param: param.clone(),
                    why,
                });
            }
        }
    }
    // Values are compared with the request's canonical path: `acm%65` is `acme`, `%c3%a9` is
    // `%C3%A9`. Stored (and listed) as such.
    for grant in &mut spec.intent {
        for (_, values) in &mut grant.constraints {
            for value in values.iter_mut() {
                if let Ok(canonical) = canonical_value(value) {
                    *value = canonical;
                }
            }
        }
    }
    let ttl = spec.ttl.unwrap_or(DEFAULT_TTL.min(agent.max_ttl));
    // The policy's durations start at one second too; less expires before it is used.
    if ttl < std::time::Duration::from_secs(1) {
        return Err(MintError::TtlTooShort);
    }
    if ttl > agent.max_ttl {
        return Err(MintError::TtlTooLong {
            agent: agent.name.clone(),
            requested_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            max_ms: u64::try_from(agent.max_ttl.as_millis()).unwrap_or(u64::MAX),
        });
    }
    if spec.max_requests == Some(0) {
        return Err(MintError::ZeroBudget);
    }
    let id = match spec.task {
        Some(id) if valid_task_id(&id) => id,
        Some(_) => return Err(MintError::BadTaskId),
        None => format!("task-{}", random_hex(8)),
    };
    let grant_index = (spec.intent.len() > GRANT_INDEX_FROM).then(|| {
        let mut index = HashMap::with_capacity_and_hasher(spec.intent.len(), Default::default());
        for (i, g) in spec.intent.iter().enumerate() {
            index.entry(g.capability.as_str().into()).or_insert(i);
        }
        index
    });
    Ok(Task {
        id,
        agent: agent.name.clone(),
        grant_index,
        intent: spec.intent,
        created_at: now,
        // Whole milliseconds, as `expires_at` is published: never a request after it.
        expires_at: whole_millis(now + ttl),
        max_requests: spec.max_requests,
        serial: {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            NEXT.fetch_add(1, Ordering::Relaxed)
        },
        token_hash: [0; 32],
        used: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        revoked: AtomicBool::new(false),
        revoked_at: std::sync::OnceLock::new(),
        cut: AtomicBool::new(false),
        revocation: tokio::sync::Notify::new(),
        in_flight: AtomicU32::new(0),
        connections: AtomicU32::new(0),
        agent_connections: Arc::default(),
        denial_due_us: AtomicU64::new(0),
        denials_waiting: AtomicU32::new(0),
    })
}

/// Applies intent-wide constraints (`--where k=v`, the mint body's top-level `where`) to every
/// capability of the intent that has a route with that parameter. A constraint that no
/// capability of the intent can take is refused rather than silently dropped.
pub fn apply_where(
    policy: &CompiledPolicy,
    mut grants: Vec<Grant>,
    constraints: &[(String, Vec<String>)],
) -> Result<Vec<Grant>, MintError> {
    // Bounded before anything is copied: each intent-wide value may land in every grant.
    let own: Vec<&(String, Vec<String>)> = grants.iter().flat_map(|g| &g.constraints).collect();
    let everywhere: Vec<&(String, Vec<String>)> = constraints.iter().collect();
    let (own_values, own_bytes) = constraint_size(&own);
    let (all_values, all_bytes) = constraint_size(&everywhere);
    let copies = grants.len();
    let values = own_values.saturating_add(all_values.saturating_mul(copies));
    let bytes = own_bytes.saturating_add(all_bytes.saturating_mul(copies));
    if values > MAX_CONSTRAINT_VALUES || bytes > MAX_CONSTRAINT_BYTES {
        return Err(MintError::TooManyConstraintValues(values, bytes));
    }
    for (param, values) in constraints {
        let mut used = false;
        for grant in &mut grants {
            let Some((_, cap)) = policy.capability(&grant.capability) else {
                return Err(MintError::UnknownCapability(grant.capability.clone()));
            };
            if cap
                .routes
                .iter()
                .any(|r| r.param_names().any(|p| p == param))
            {
                grant.constraints.push((param.clone(), values.clone()));
                used = true;
            }
        }
        if !used {
            return Err(MintError::UnknownIntentParam(param.clone()));
        }
    }
    Ok(grants)
}

/// Values and bytes of a task's constraints.
fn constraint_size(constraints: &[&(String, Vec<String>)]) -> (usize, usize) {
    constraints.iter().fold((0, 0), |(n, b), (_, values)| {
        (
            n + values.len(),
            b + values.iter().map(String::len).sum::<usize>(),
        )
    })
}

/// Each value is held for the task's life and the hour after: bounded.
fn check_constraint_size(constraints: &[&(String, Vec<String>)]) -> Result<(), MintError> {
    let (values, bytes) = constraint_size(constraints);
    if values > MAX_CONSTRAINT_VALUES || bytes > MAX_CONSTRAINT_BYTES {
        return Err(MintError::TooManyConstraintValues(values, bytes));
    }
    Ok(())
}

/// Builds plain grants from capability names and applies intent-wide constraints.
pub fn grants_with_where(
    policy: &CompiledPolicy,
    names: Vec<String>,
    constraints: &[(String, Vec<String>)],
) -> Result<Vec<Grant>, MintError> {
    let grants = names
        .into_iter()
        .map(|capability| Grant {
            capability,
            constraints: Vec::new(),
        })
        .collect();
    apply_where(policy, grants, constraints)
}

/// `ms` as seconds to the millisecond (`3600.001s`), in integers: a float would round a
/// huge ttl to another number.
fn seconds(ms: u64) -> String {
    match ms % 1000 {
        0 => format!("{}s", ms / 1000),
        frac => format!("{}.{frac:03}s", ms / 1000),
    }
}

/// Task ids travel in `Proxy-Authorization` user names, audit records and URLs: keep them plain.
/// `:` would split Basic credentials differently, so it is refused with the rest.
pub fn valid_task_id(id: &str) -> bool {
    // `.` and `..` would be path segments in `/v1/tasks/{id}` that clients normalize away.
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= MAX_TASK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Length of a token after its `kw_` prefix (256 bits, URL-safe base64 without padding).
const TOKEN_BODY_LEN: usize = 43;

/// `text` with every substring shaped like a task token replaced by `[redacted]`, or `None`
/// when it has none. For what keyward persists of an agent's bytes (an agent may put its own
/// token in a path); tokens are not stored, so their shape is what can be found. A path's
/// bytes may be percent-encoded (`%6B` for `k`; the matcher and most servers decode them), or
/// encoded twice (`%256B`, `%25%36%42`): a token written so is found, and cut as written.
pub fn redact_tokens(text: &str) -> Option<String> {
    let is_token_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let bytes = text.as_bytes();
    if memchr::memchr(b'%', bytes).is_none() && memchr::memmem::find(bytes, b"kw_").is_none() {
        return None;
    }
    // Each unit of `text`: the byte it stands for and where it is written (start, end).
    // Decoded up to three times: `%6B`, `%256B`, `%25%36%42` all stand for `k`.
    let mut units: Vec<(u8, usize, usize)> = bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| (b, i, i + 1))
        .collect();
    for _ in 0..3 {
        let decoded = percent_decode_units(&units);
        if decoded.len() == units.len() {
            break;
        }
        units = decoded;
    }
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut u = 0;
    while u + 3 <= units.len() {
        if !(units[u].0 == b'k' && units[u + 1].0 == b'w' && units[u + 2].0 == b'_') {
            u += 1;
            continue;
        }
        let body = units[u + 3..]
            .iter()
            .take_while(|(b, ..)| is_token_byte(*b))
            .count();
        if body >= TOKEN_BODY_LEN {
            let o = out.get_or_insert_with(String::new);
            o.push_str(&text[copied..units[u].1]);
            o.push_str("[redacted]");
            copied = units[u + 2 + body].2;
        }
        u += 3 + body;
    }
    out.map(|mut o| {
        o.push_str(&text[copied..]);
        o
    })
}

/// `units` with every `%` followed by two hex digits taken as the byte they spell.
fn percent_decode_units(units: &[(u8, usize, usize)]) -> Vec<(u8, usize, usize)> {
    let hex = |u: Option<&(u8, usize, usize)>| u.and_then(|u| char::from(u.0).to_digit(16));
    let mut out = Vec::with_capacity(units.len());
    let mut i = 0;
    while let Some(&unit) = units.get(i) {
        if let (b'%', Some(hi), Some(lo)) = (unit.0, hex(units.get(i + 1)), hex(units.get(i + 2))) {
            let byte = u8::try_from(hi * 16 + lo).unwrap_or(b'%');
            out.push((byte, unit.1, units[i + 2].2));
            i += 3;
        } else {
            out.push(unit);
            i += 1;
        }
    }
    out
}

fn new_token() -> Secret {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    fill_random(bytes.as_mut());
    Secret::new(format!("kw_{}", URL_SAFE_NO_PAD.encode(bytes.as_ref())))
}

fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Fills `buf` from the OS generator. If the OS cannot give randomness we must not mint
/// predictable tokens; `getrandom` failing on Linux means no usable kernel, so we abort.
pub fn fill_random(buf: &mut [u8]) {
    if getrandom::fill(buf).is_err() {
        tracing::error!("the operating system's random generator failed; refusing to continue");
        std::process::abort();
    }
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    fill_random(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_token_is_found_anywhere_and_its_shape_alone_is_not() {
        let (store, _, token) = minted_with_token(SystemTime::now());
        let t = token.expose();
        for text in [
            t.to_string(),
            format!("Bearer {t}"),
            format!("a:{t}-x"),
            format!("kw_kw_{t}"),
            format!("peak{t}"),
        ] {
            assert!(store.knows_token_in(text.as_bytes()), "{text}");
        }
        // Shaped like a token, or a token cut short, but no task's.
        let shaped = format!("kw_{}", "0".repeat(TOKEN_BODY_LEN));
        let other = new_token();
        let short = &t[..t.len() - 1];
        for text in ["", "kw_", "/kw_short/x", short, &shaped, other.expose()] {
            assert!(!store.knows_token_in(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn token_shapes_are_redacted_from_persisted_text() {
        let token = new_token();
        let t = token.expose();
        assert_eq!(redact_tokens("/repos/acme/web/issues"), None);
        assert_eq!(redact_tokens("/kw_short/x"), None, "not a token's length");
        assert_eq!(
            redact_tokens(&format!("/a/{t}/b/{t}")).as_deref(),
            Some("/a/[redacted]/b/[redacted]")
        );
        assert_eq!(
            redact_tokens(&format!("{t}x-more")).as_deref(),
            Some("[redacted]"),
            "a longer run is taken whole"
        );
        // Percent-encoded, in part, whole (any case), or twice: found, and cut as written.
        let enc = |s: &str, every: usize| -> String {
            s.bytes()
                .enumerate()
                .map(|(i, b)| {
                    if i % every == 0 {
                        format!("%{b:02x}")
                    } else {
                        char::from(b).to_string()
                    }
                })
                .collect()
        };
        for spelled in [
            enc(t, 7),
            enc(t, 1),
            enc(t, 1).to_uppercase(),
            enc(t, 2).replace('%', "%25"),
            enc(&enc(t, 1), 1),
            enc(&enc(&enc(t, 3), 2), 5),
        ] {
            assert_eq!(
                redact_tokens(&format!("/a/{spelled}/b")).as_deref(),
                Some("/a/[redacted]/b"),
                "{spelled}"
            );
        }
        // Other encoded bytes, a lone `%`, and a run too short are left alone.
        assert_eq!(redact_tokens("/a%2Fb/%41%zz/100%"), None);
        assert_eq!(redact_tokens(&format!("/%6bw_{}", &t[3..40])), None);
        assert_eq!(
            redact_tokens(&format!("/é/{}%41/ü", enc(t, 3))).as_deref(),
            Some("/é/[redacted]/ü")
        );
    }

    /// Mints a task of capability `s.files` (`GET /r/{repo}/f/{*path}`) held to
    /// `param = value`; the value as stored.
    fn mint_files(param: &str, value: &str) -> Result<String, MintError> {
        let text = format!(
            "{}services:\n  s: {{hosts: [s.example]}}\ncapabilities:\n  s.files: {{service: s, routes: [\"GET /r/{{repo}}/f/{{*path}}\"]}}\nagents:\n  bot: {{owner: t, capabilities: [s.files], max_ttl: 1h}}\n",
            crate::policy::testing::ADMIN
        );
        let policy = CompiledPolicy::compile(crate::policy::testing::ok(&text));
        let spec = MintSpec {
            agent: "bot".into(),
            task: None,
            intent: vec![Grant {
                capability: "s.files".into(),
                constraints: vec![(param.into(), vec![value.into()])],
            }],
            ttl: None,
            max_requests: None,
        };
        TaskStore::new()
            .mint(&policy, spec, SystemTime::now())
            .map(|(task, _)| task.intent[0].constraints[0].1[0].clone())
    }

    #[test]
    fn a_value_with_a_slash_constrains_only_a_parameter_that_spans_segments() {
        let mint = mint_files;
        assert!(mint("path", "docs/readme.md").is_ok());
        assert!(matches!(
            mint("repo", "acme/web"),
            Err(MintError::UnmatchableConstraint { .. })
        ));
        assert!(mint("repo", "web").is_ok());
    }

    #[test]
    fn constraint_values_are_held_as_a_request_path_spells_them() {
        let mint = mint_files;
        // Stored canonical: what the request's capture will be.
        assert_eq!(mint("repo", "acm%65").unwrap(), "acme");
        assert_eq!(mint("repo", "a%c3%a9").unwrap(), "a%C3%A9");
        assert_eq!(mint("path", "docs/r%65adme.md").unwrap(), "docs/readme.md");
        assert_eq!(mint("repo", "web").unwrap(), "web");
        // No request path holds these as written: refused, with why.
        for (value, why) in [
            ("\u{e9}", "non_ascii"),
            ("a b", "space"),
            ("..", "dot_segment"),
            ("a;b", "semicolon"),
            ("a%2", "malformed_percent"),
            ("a%25b", "encoded_percent"),
            ("a%3Fb", "encoded_delimiter"),
            // As a path these would end the value early: `web?x` held as `web`.
            ("web?x", "encoded_delimiter"),
            ("a.md#x", "encoded_delimiter"),
            ("?", "encoded_delimiter"),
        ] {
            match mint("repo", value) {
                Err(e @ MintError::NonCanonicalConstraint { .. }) => {
                    assert!(e.to_string().contains(why), "{value}: {e}")
                }
                other => panic!("{value}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_ttl_over_max_ttl_by_a_millisecond_says_so() {
        let policy = read_policy();
        let spec = MintSpec {
            agent: "bot".into(),
            task: None,
            intent: vec![Grant {
                capability: "s.read".into(),
                constraints: Vec::new(),
            }],
            ttl: Some(Duration::from_millis(3_600_001)),
            max_requests: None,
        };
        let err = TaskStore::new()
            .mint(&policy, spec, SystemTime::now())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "ttl 3600.001s exceeds agent `bot`'s max_ttl of 3600s"
        );
    }

    fn minted_at(now: SystemTime) -> (TaskStore, Arc<Task>) {
        let (store, task, _) = minted_with_token(now);
        (store, task)
    }

    fn minted_with_token(now: SystemTime) -> (TaskStore, Arc<Task>, Secret) {
        let policy = read_policy();
        let store = TaskStore::new();
        let spec = MintSpec {
            agent: "bot".into(),
            task: Some("t1".into()),
            intent: vec![Grant {
                capability: "s.read".into(),
                constraints: Vec::new(),
            }],
            ttl: None,
            max_requests: None,
        };
        let (task, token) = store.mint(&policy, spec, now).unwrap();
        (store, task, token)
    }

    /// A second's worth of denials goes at once; then each waits its turn, at most
    /// `max_waiting` at a time, and past that the connection is to close.
    #[test]
    fn denials_are_paced_then_flooding_closes() {
        let (_store, task) = minted_at(SystemTime::now());
        // 10 a second, at most 2 waiting; `ms` after the 5 s mark.
        let at = |ms: u64| task.pace_denial_at(5_000_000 + ms * 1000, 10, 2);
        for i in 0..10 {
            assert!(matches!(at(i), DenialPace::Now), "denial {i}");
        }
        let DenialPace::Wait(first, one) = at(20) else {
            panic!("the 11th denial within a second waits");
        };
        assert_eq!(first, Duration::from_millis(80));
        let DenialPace::Wait(second, two) = at(20) else {
            panic!("so does the 12th");
        };
        assert_eq!(second, Duration::from_millis(180));
        assert!(matches!(at(30), DenialPace::Flooding));
        assert_eq!(
            task.denials_waiting.load(Ordering::Acquire),
            2,
            "a flooding denial waits for nothing"
        );
        // Once one of the waiting denials has gone out, the next waits behind the others.
        drop(one);
        let DenialPace::Wait(third, three) = at(40) else {
            panic!("a place to wait is free again");
        };
        assert_eq!(third, Duration::from_millis(260));
        drop((two, three));
        // After a quiet spell, a second's worth goes at once again.
        for i in 0..10 {
            assert!(
                matches!(at(1500 + i), DenialPace::Now),
                "after a pause, {i}"
            );
        }
    }

    /// One service, one capability (`s.read`: `GET /x`), agent `bot` with a 1 h `max_ttl`.
    fn read_policy() -> CompiledPolicy {
        let text = format!(
            "{}services:\n  s: {{hosts: [s.example]}}\ncapabilities:\n  s.read: {{service: s, routes: [GET /x]}}\nagents:\n  bot: {{owner: t, capabilities: [s.read], max_ttl: 1h}}\n",
            crate::policy::testing::ADMIN
        );
        CompiledPolicy::compile(crate::policy::testing::ok(&text))
    }

    /// A store holds at most its limit of tasks: a full one forgets its ended tasks before it
    /// refuses a mint, and refuses while every task it holds is live.
    #[test]
    fn a_full_store_forgets_ended_tasks_then_refuses() {
        let policy = read_policy();
        let spec = |id: &str| MintSpec {
            agent: "bot".into(),
            task: Some(id.into()),
            intent: vec![Grant {
                capability: "s.read".into(),
                constraints: Vec::new(),
            }],
            ttl: None,
            max_requests: None,
        };
        let now = SystemTime::now();
        let store = TaskStore::with_limit(2);
        store.mint(&policy, spec("a"), now).unwrap();
        store.mint(&policy, spec("b"), now).unwrap();
        let full = store.mint(&policy, spec("c"), now).map(|_| ()).unwrap_err();
        assert_eq!(full, MintError::TooMany(2));
        assert!(full.to_string().contains("admin.max_tasks"), "{full}");
        assert_eq!(store.len(), 2);
        // An ended task gives its place at once, not an hour later.
        store.revoke("a");
        store.mint(&policy, spec("c"), now).unwrap();
        assert!(store.get("a").is_none());
        assert_eq!(store.len(), 2);
        // Expired ones too.
        let later = now + Duration::from_secs(7200);
        store.mint(&policy, spec("d"), later).unwrap();
        assert_eq!(store.len(), 1);
    }

    /// A revoked task is forgotten an hour after its revocation, not an hour after the expiry
    /// it will never reach (a 24 h task revoked at once would otherwise be held for 25 h).
    #[test]
    fn a_revoked_task_is_forgotten_an_hour_after_revocation() {
        let now = SystemTime::now();
        let (store, task) = minted_at(now);
        let (_, live) = minted_at(now);
        let live_store = TaskStore::new();
        live_store.by_id.insert("live".into(), live);
        store.revoke("t1");
        let minute = Duration::from_secs(60);
        assert!(
            task.expires_at > now + 29 * minute,
            "the task outlives the checks below"
        );
        store.purge(now + 59 * minute);
        assert!(store.get("t1").is_some(), "kept for an hour to be listed");
        store.purge(now + 61 * minute);
        assert!(
            store.get("t1").is_none(),
            "forgotten an hour after revocation"
        );
        assert_eq!(store.by_hash.len(), 0);
        // A task never revoked stays until an hour after its expiry.
        live_store.purge(now + 61 * minute);
        assert!(live_store.get("live").is_some());
        live_store.purge(task.expires_at + 61 * minute);
        assert!(live_store.get("live").is_none());
    }

    /// `expires_at` is published to the millisecond: the task ends exactly then, not up to a
    /// millisecond after a time a reader takes as passed.
    #[test]
    fn a_task_expires_at_the_millisecond_it_publishes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_794_040_854_999_999);
        let (_store, task) = minted_at(now);
        let published =
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_794_040_854 + 1_800_000);
        assert_eq!(task.expires_at, published);
        assert!(task.is_expired(published));
        assert!(!task.is_expired(published - Duration::from_nanos(1)));
    }

    #[tokio::test]
    async fn ended_completes_on_revocation_and_at_expiry() {
        let (store, task) = minted_at(SystemTime::now());
        let waiting = tokio::spawn({
            let task = task.clone();
            async move { task.ended().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a live task has not ended");
        store.revoke("t1");
        let end = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(end.unwrap().unwrap(), TaskEnd::Revoked);
        // Asked after the fact, it answers at once.
        assert_eq!(task.ended().await, TaskEnd::Revoked);

        let (_store, old) = minted_at(SystemTime::now() - Duration::from_secs(2 * 3600));
        assert_eq!(old.ended().await, TaskEnd::Expired);
        assert_eq!(old.ended_at(SystemTime::now()), Some(TaskEnd::Expired));
    }

    #[test]
    fn task_ids_are_plain() {
        assert!(valid_task_id("TICKET-123"));
        assert!(valid_task_id("a.b_c-1"));
        assert!(!valid_task_id(""));
        assert!(!valid_task_id("a:b"));
        assert!(!valid_task_id("a b"));
        assert!(!valid_task_id(&"x".repeat(129)));
    }

    #[test]
    fn tokens_are_prefixed_and_random() {
        let a = new_token();
        let b = new_token();
        assert!(a.expose().starts_with("kw_"));
        assert!(a.expose().len() >= 3 + 43);
        assert_ne!(a.expose(), b.expose());
    }
}
