//! Admin route handlers: tasks (mint, list, get, revoke), reload, metrics, readiness.
//! Task listings never include tokens; errors name what is wrong, never a secret.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use crate::admin::{error, json, text, AdminResponse};
use crate::state::State;
use crate::tasks::{Grant, MintError, MintSpec, Task};

const MAX_BODY: usize = 64 * 1024;

pub async fn v1(state: &Arc<State>, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    // Only the task list takes parameters; on any other route one is a mistake, said rather
    // than ignored (a `DELETE …?force=1` revokes nothing).
    let query = req.uri().query().is_some_and(|q| !q.is_empty());
    if query && !(method == Method::GET && path == "/v1/tasks") {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "this route takes no query parameters",
        );
    }
    match (&method, path.as_str()) {
        (&Method::POST, "/v1/tasks") => mint(state, req).await,
        (&Method::GET, "/v1/tasks") => match ListFilter::parse(req.uri().query()) {
            Ok(filter) => {
                let now = SystemTime::now();
                let mut tasks = state.tasks.list();
                if let Some(after) = &filter.after {
                    // Sorted by id: the page starts past the cursor, whether or not that task
                    // still exists.
                    tasks.drain(..tasks.partition_point(|t| t.id.as_str() <= after.as_str()));
                }
                tasks.retain(|t| filter.keeps(t, now));
                let next = match filter.limit {
                    Some(limit) if tasks.len() > limit => {
                        tasks.truncate(limit);
                        tasks.last().map(|t| t.id.clone())
                    }
                    _ => None,
                };
                let listing = Listing {
                    tasks: &tasks,
                    next: next.as_deref(),
                    now,
                };
                json(StatusCode::OK, &listing)
            }
            Err(message) => error(StatusCode::BAD_REQUEST, "bad_query", &message),
        },
        (&Method::POST, "/v1/reload") => match reload_unless_stopping(state).await {
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "keyward is stopping; the reload was dropped and the policy it had kept serving",
            ),
            Some(Ok(r)) => json(
                StatusCode::OK,
                &json!({ "policy_version": r.version, "restart_required": r.restart_required, "credentials_unreadable": r.credentials_unreadable }),
            ),
            Some(Err(errors)) => {
                let list: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                json(
                    StatusCode::BAD_REQUEST,
                    &json!({ "error": "invalid_policy", "reason": "invalid_policy", "message": "the new policy is invalid; the old one keeps serving", "errors": list }),
                )
            }
        },
        (m, p) if p.starts_with("/v1/tasks/") => {
            let id = &p["/v1/tasks/".len()..];
            match *m {
                Method::GET => match state.tasks.get(id) {
                    Some(t) => json(StatusCode::OK, &task_json(&t, SystemTime::now())),
                    None => not_found(),
                },
                Method::DELETE => match state.tasks.revoke(id) {
                    Some(t) => {
                        tracing::info!(task = %t.id, agent = %t.agent, "task revoked");
                        json(StatusCode::OK, &task_json(&t, SystemTime::now()))
                    }
                    None => not_found(),
                },
                _ => method_not_allowed("GET or DELETE"),
            }
        }
        (_, "/v1/tasks") => method_not_allowed("GET or POST"),
        (_, "/v1/reload") => method_not_allowed("POST"),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// A reload, unless keyward starts to stop first: a stop is not held up by it (a credential
/// `exec` may take 30 s); the reload is dropped unfinished and the old policy kept serving.
async fn reload_unless_stopping(
    state: &State,
) -> Option<Result<crate::state::Reloaded, crate::policy::PolicyErrors>> {
    tokio::select! {
        reloaded = state.reload() => Some(reloaded),
        () = state.stopped() => None,
    }
}

fn not_found() -> AdminResponse {
    error(StatusCode::NOT_FOUND, "unknown_task", "no task has this id")
}

pub fn method_not_allowed(allowed: &'static str) -> AdminResponse {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this endpoint takes {allowed}"),
    );
    let allow = allowed.replace(" or ", ", ");
    if let Ok(v) = http::HeaderValue::try_from(allow) {
        resp.headers_mut().insert(http::header::ALLOW, v);
    }
    resp
}

/// The body of `POST /v1/tasks`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    agent: String,
    #[serde(default)]
    task: Option<String>,
    intent: Vec<IntentItem>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    max_requests: Option<u64>,
    /// keyward extension: constraints applied to every capability of the intent that has the
    /// parameter (what `keyward task mint --where` sends).
    #[serde(default, rename = "where")]
    where_all: Constraints,
}

enum IntentItem {
    Name(String),
    Constrained(ConstrainedItem),
}

/// By hand rather than `untagged`: serde's untagged error says only that neither form
/// matched, where the object form's own error (a parameter named twice, an unknown key, a
/// number for a value) says what is wrong.
impl<'de> Deserialize<'de> for IntentItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = IntentItem;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "an intent item: a capability name or {\"capability\": ..., \"where\": {...}}",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntentItem, E> {
                Ok(IntentItem::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<IntentItem, A::Error> {
                ConstrainedItem::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(IntentItem::Constrained)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// SECURITY: a misspelt `where` must not mint the capability unconstrained.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstrainedItem {
    capability: String,
    #[serde(default, rename = "where")]
    constraints: Constraints,
}

/// A `where` object. SECURITY: a parameter named twice is refused, not "the last one wins":
/// an approval step that read the first would approve another task than keyward enforces.
#[derive(Default)]
struct Constraints(BTreeMap<String, OneOrMany>);

impl<'de> Deserialize<'de> for Constraints {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Constraints;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of parameter: value or [values]")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Constraints, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, OneOrMany>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "parameter `{k}` is named twice in `where`"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Constraints(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// By hand for the same reason as `IntentItem`: say what a value must be.
impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a constraint value: a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<OneOrMany, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(OneOrMany::Many)
            }
        }
        d.deserialize_any(Visit)
    }
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(list) => list,
        }
    }
}

async fn mint(state: &Arc<State>, req: Request<Incoming>) -> AdminResponse {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the body is over 64 KiB",
        )
    };
    // Said up front: answered at once, not after waiting for a body that will not fit.
    if hyper::body::Body::size_hint(req.body()).lower() > MAX_BODY as u64 {
        return too_large();
    }
    // A body trickled in slowly is bounded like a request head.
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(state.settings.header_read_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(_)) => return bad_request("bad_body", "the body could not be read"),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the body did not arrive within header_read_timeout",
            )
        }
    };
    // serde reads a struct from a JSON array too (its fields in order): one input form only.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return bad_request("bad_json", "the mint request must be a JSON object");
    }
    let parsed: MintRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad_request("bad_json", &format!("invalid mint request: {e}")),
    };
    let ttl = match parsed.ttl.as_deref().map(crate::policy::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(why)) => return bad_request("invalid_ttl", &format!("ttl: {why}")),
    };
    let intent: Vec<Grant> = parsed
        .intent
        .into_iter()
        .map(|i| match i {
            IntentItem::Name(capability) => Grant {
                capability,
                constraints: Vec::new(),
            },
            IntentItem::Constrained(ConstrainedItem {
                capability,
                constraints,
            }) => Grant {
                capability,
                constraints: constraints
                    .0
                    .into_iter()
                    .map(|(k, v)| (k, v.into_vec()))
                    .collect(),
            },
        })
        .collect();
    let generation = state.current();
    let everywhere: Vec<(String, Vec<String>)> = parsed
        .where_all
        .0
        .into_iter()
        .map(|(k, v)| (k, v.into_vec()))
        .collect();
    let intent = match crate::tasks::apply_where(&generation.policy, intent, &everywhere) {
        Ok(i) => i,
        Err(e) => return bad_request(mint_error_code(&e), &e.to_string()),
    };
    let spec = MintSpec {
        agent: parsed.agent,
        task: parsed.task,
        intent,
        ttl,
        max_requests: parsed.max_requests,
    };
    match state
        .tasks
        .mint(&generation.policy, spec, SystemTime::now())
    {
        Ok((task, token)) => {
            let proxy = state
                .listeners
                .proxy()
                .map(reachable)
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(task = %task.id, agent = %task.agent, "task minted");
            json(
                StatusCode::CREATED,
                &json!({
                    "task": task.id,
                    "agent": task.agent,
                    "token": token.expose(),
                    "expires_at": rfc3339(task.expires_at),
                    "proxy_url": format!("http://{}:{}@{}", task.id, token.expose(), proxy),
                }),
            )
        }
        Err(MintError::Conflict(id)) => error(
            StatusCode::CONFLICT,
            "task_exists",
            &format!("task id `{id}` is in use"),
        ),
        // Full for now, not a bad request: the same mint succeeds once tasks end (a full
        // store looks for ended ones at most once a second, or after a revocation).
        Err(e @ MintError::TooMany(_)) => {
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                mint_error_code(&e),
                &e.to_string(),
            );
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
            resp
        }
        Err(e) => bad_request(mint_error_code(&e), &e.to_string()),
    }
}

fn mint_error_code(e: &MintError) -> &'static str {
    match e {
        MintError::UnknownAgent(_) => "unknown_agent",
        MintError::UnknownCapability(_) => "unknown_capability",
        MintError::NotGranted { .. } => "capability_not_granted",
        MintError::UnknownParam { .. }
        | MintError::UnknownIntentParam(_)
        | MintError::EmptyConstraint(_)
        | MintError::UnmatchableConstraint { .. }
        | MintError::ControlInConstraint { .. }
        | MintError::NonCanonicalConstraint { .. }
        | MintError::DuplicateConstraint { .. }
        | MintError::TooManyConstraintValues(..) => "invalid_constraint",
        MintError::DuplicateCapability(_) => "duplicate_capability",
        MintError::EmptyIntent => "empty_intent",
        MintError::TtlTooLong { .. } | MintError::TtlTooShort => "invalid_ttl",
        MintError::ZeroBudget => "invalid_max_requests",
        MintError::BadTaskId => "invalid_task_id",
        MintError::Conflict(_) => "task_exists",
        MintError::TooMany(_) => "too_many_tasks",
    }
}

fn bad_request(code: &str, message: &str) -> AdminResponse {
    error(StatusCode::BAD_REQUEST, code, message)
}

fn status_of(t: &Task, now: SystemTime) -> &'static str {
    if t.is_revoked() {
        "revoked"
    } else if t.is_expired(now) {
        "expired"
    } else {
        "active"
    }
}

/// `GET /v1/tasks?agent=NAME&status=active|expired|revoked&limit=N&after=ID`: which tasks to
/// list (all by default; with thousands of live tasks an operator looks for one agent's, or
/// the live ones), and a page of them: at most `limit`, with ids after `after` (the answer's
/// `next` when more remain).
#[derive(Debug, Default, PartialEq, Eq)]
struct ListFilter {
    agent: Option<String>,
    status: Option<&'static str>,
    limit: Option<usize>,
    after: Option<String>,
}

/// The largest page `GET /v1/tasks?limit=` gives.
const MAX_PAGE: usize = 10_000;

impl ListFilter {
    fn parse(query: Option<&str>) -> Result<ListFilter, String> {
        let mut filter = ListFilter::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                // A name as the policy writes it: no encoding is needed, so none is guessed at.
                "agent" if filter.agent.is_none() => {
                    crate::policy::check_name(value).map_err(|why| format!("`agent`: {why}"))?;
                    filter.agent = Some(value.to_string());
                }
                "status" if filter.status.is_none() => {
                    filter.status = Some(match value {
                        "active" => "active",
                        "expired" => "expired",
                        "revoked" => "revoked",
                        _ => return Err("`status` is one of active, expired, revoked".into()),
                    })
                }
                "limit" if filter.limit.is_none() => {
                    filter.limit = Some(
                        Some(value)
                            .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|v| v.parse().ok())
                            .filter(|n| (1..=MAX_PAGE).contains(n))
                            .ok_or_else(|| format!("`limit` is a number from 1 to {MAX_PAGE}"))?,
                    );
                }
                // A task id as minted: no encoding is needed, so none is guessed at.
                "after" if filter.after.is_none() => {
                    if !crate::tasks::valid_task_id(value) {
                        return Err("`after` is a task id (the `next` of the last page)".into());
                    }
                    filter.after = Some(value.to_string());
                }
                "agent" | "status" | "limit" | "after" => {
                    return Err(format!("`{key}` is given twice"))
                }
                _ => {
                    return Err(
                        "the task list takes `agent`, `status`, `limit` and `after` only".into(),
                    )
                }
            }
        }
        Ok(filter)
    }

    fn keeps(&self, t: &Task, now: SystemTime) -> bool {
        self.agent.as_deref().map_or(true, |a| t.agent == a)
            && self.status.map_or(true, |s| status_of(t, now) == s)
    }
}

/// `GET /v1/tasks`: serialized task by task into the answer, without a JSON tree of every
/// task first (tens of thousands of tasks made one ten times the answer's size).
struct Listing<'a> {
    tasks: &'a [Arc<Task>],
    /// The `after` of the next page, when the page was cut at its `limit`.
    next: Option<&'a str>,
    now: SystemTime,
}

impl serde::Serialize for Listing<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Tasks<'a>(&'a Listing<'a>);
        impl serde::Serialize for Tasks<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.tasks.iter().map(|t| task_json(t, self.0.now)))
            }
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("tasks", &Tasks(self))?;
        if let Some(next) = self.next {
            map.serialize_entry("next", next)?;
        }
        map.end()
    }
}

/// A task as the admin API shows it (never its token). Fields in the order the JSON has
/// always listed them (alphabetical).
#[derive(serde::Serialize)]
struct TaskView<'a> {
    agent: &'a str,
    /// Agent connections (and tunnels) the task holds now.
    connections: u32,
    created_at: String,
    expires_at: String,
    intent: Vec<GrantView<'a>>,
    max_requests: Option<u64>,
    requests_denied: u64,
    /// Requests of the task in flight now.
    requests_in_flight: u32,
    requests_used: u64,
    status: &'static str,
    task: &'a str,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum GrantView<'a> {
    Bare(&'a str),
    Constrained {
        capability: &'a str,
        #[serde(rename = "where")]
        constraints: BTreeMap<&'a str, &'a Vec<String>>,
    },
}

fn task_json(t: &Task, now: SystemTime) -> TaskView<'_> {
    let intent = t
        .intent
        .iter()
        .map(|g| match g.constraints.is_empty() {
            true => GrantView::Bare(&g.capability),
            false => GrantView::Constrained {
                capability: &g.capability,
                constraints: g.constraints.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            },
        })
        .collect();
    let status = status_of(t, now);
    TaskView {
        agent: &t.agent,
        connections: t.connections(),
        created_at: rfc3339(t.created_at),
        expires_at: rfc3339(t.expires_at),
        intent,
        max_requests: t.max_requests,
        requests_denied: t.requests_denied(),
        requests_in_flight: t.in_flight(),
        requests_used: t.requests_used(),
        status,
        task: &t.id,
    }
}

/// The address an agent beside keyward dials: a wildcard listener (`0.0.0.0`, `::`) is not
/// one, so loopback of the same family stands in for it (a sidecar's agent shares the pod's
/// network; others know the address they reach keyward at).
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, addr.port())
}

/// RFC 3339 in UTC to the millisecond, always three digits (`2026-11-27T15:40:40.850Z`): an
/// expiry printed to the second would read as passed while the task still runs for most of a
/// second, and a fixed width keeps the strings sortable.
pub fn rfc3339(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::try_from(ms).unwrap_or(0) * 1_000_000)
        .ok()
        .and_then(|d| d.format(&format).ok())
        .unwrap_or_default()
}

pub fn metrics(state: &Arc<State>) -> AdminResponse {
    let now = SystemTime::now();
    state.metrics.tasks_active_reset();
    // Every agent of the policy has a series, at 0 when it has no live task: a series that
    // vanished would read as "no data" on a dashboard, and `== 0` would never match.
    for agent in &state.current().policy.policy().agents {
        state.metrics.tasks_active_set(&agent.name, 0);
    }
    for (agent, n) in state.tasks.active_by_agent(now) {
        state.metrics.tasks_active_set(&agent, n);
    }
    state.metrics.leaf_issued_total(state.leaves.issued_total());
    let mut resp = text(StatusCode::OK, state.metrics.render());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

pub fn readyz(state: &Arc<State>) -> AdminResponse {
    let generation = state.current();
    let unreadable: Vec<&str> = generation.credentials.unreadable();
    // Not ready while the audit queue is backed up: requests would be refused (503).
    let audit = state.audit.accepting();
    let listening = state.listeners.proxy().is_some();
    let stopping = state.is_shutting_down();
    let ready = unreadable.is_empty() && audit && listening && !stopping;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &json!({
            "ready": ready,
            "policy_version": generation.policy.version(),
            "credentials_unreadable": unreadable,
            "audit_ok": audit,
            "listening": listening,
            "shutting_down": stopping,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_advertised_as_loopback() {
        for (listen, advertised) in [
            ("0.0.0.0:8480", "127.0.0.1:8480"),
            ("[::]:8480", "[::1]:8480"),
            ("10.0.0.7:8480", "10.0.0.7:8480"),
            ("127.0.0.1:1", "127.0.0.1:1"),
        ] {
            assert_eq!(reachable(listen.parse().unwrap()).to_string(), advertised);
        }
    }

    #[test]
    fn times_are_printed_to_the_millisecond() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(rfc3339(at(1_795_794_040_854)), "2026-11-27T15:40:40.854Z");
        assert_eq!(rfc3339(at(1_795_794_040_850)), "2026-11-27T15:40:40.850Z");
        assert_eq!(
            rfc3339(at(1_795_794_040_000) + Duration::from_micros(999)),
            "2026-11-27T15:40:40.000Z"
        );
    }
}
