//! The only place a `Reason` or an upstream failure becomes a response to the agent.
//!
//! Bodies are RFC 9457 problem documents built from closed enums and policy names; they never
//! carry an error's `Display`/`Debug`, a path, a query, a header value or a secret.

use http::header::{HeaderValue, CONTENT_TYPE, PROXY_AUTHENTICATE};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::decide::Denial;
use crate::policy::CompiledPolicy;
use crate::proxy::body::ProxyBody;
use crate::reason::Reason;

pub const REASON_HEADER: &str = "x-keyward-reason";

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    reason: &'a str,
    request_id: &'a str,
    /// `null` where no task is known (a 407, a head too large to read): every problem
    /// document has the same keys.
    task: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    capability: Option<&'a str>,
}

/// What the agent is told about a denial.
pub struct DenyInfo<'a> {
    pub reason: Reason,
    pub request_id: &'a str,
    pub task: Option<&'a str>,
    /// A capability that would have allowed the request.
    pub hint: Option<Hint<'a>>,
    /// What precisely was refused, from a closed set (`dot_segment`, `host_override`,
    /// `in_flight`, ...): it chooses the detail sentence, and the record keeps it (`detail`).
    pub code: Option<&'static str>,
}

/// A capability named in a denial.
#[derive(Clone, Copy)]
pub struct Hint<'a> {
    pub name: &'a str,
    /// Its risk tier (`high`, `critical`) when it needs an approval: a task that includes it
    /// would still be refused.
    pub approval: Option<&'static str>,
}

/// What a denial tells the agent beyond its reason (SPEC §4.3): the capability that would
/// allow the request (for a broken constraint or a missing approval, the intent's own one that
/// matched), and a code that makes the detail precise.
pub fn explain<'p>(
    policy: &'p CompiledPolicy,
    denial: &Denial,
    code: Option<&'static str>,
    host: &str,
) -> (Option<Hint<'p>>, Option<&'static str>) {
    let named = match denial.reason {
        Reason::ConstraintMismatch | Reason::ApprovalRequired => denial.capability.or(denial.hint),
        _ => denial.hint,
    };
    let hint = named.map(|c| {
        let cap = policy.capability_at(c);
        Hint {
            name: cap.name.as_str(),
            approval: cap.risk.needs_approval().then(|| cap.risk.as_str()),
        }
    });
    let code = match denial.reason {
        Reason::UnknownHost if code.is_none() && policy.serves_host(host) => Some(OTHER_PORT),
        // (A CONNECT to it is a tunnel, never this refusal: a request came in absolute form.)
        Reason::UnknownHost if code.is_none() && policy.is_passthrough(host) => {
            Some(PASSTHROUGH_ONLY)
        }
        _ => code,
    };
    (hint, code)
}

/// `DenyInfo::code` of an `unknown_host` whose host a service has on another port or
/// scheme.
const OTHER_PORT: &str = "other_port";
/// `DenyInfo::code` of an `unknown_host` for a passthrough host asked in absolute form.
const PASSTHROUGH_ONLY: &str = "passthrough_only";

/// A denial: the reason's status, `X-Keyward-Reason`, a problem document; 407s carry the
/// `Proxy-Authenticate` challenge.
pub fn deny(info: &DenyInfo<'_>) -> Response<ProxyBody> {
    let status = match info.code {
        // RFC 6585's own status: the agent may shorten its headers and retry.
        Some(HEAD_TOO_LARGE) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => info.reason.status(),
    };
    let detail = detail(info);
    let problem = Problem {
        kind: format!("urn:keyward:reason:{}", info.reason.as_str()),
        title: info.reason.title(),
        status: status.as_u16(),
        detail,
        reason: info.reason.as_str(),
        request_id: info.request_id,
        task: info.task,
        capability: info.hint.map(|h| h.name),
    };
    let mut resp = problem_response(status, &problem);
    resp.headers_mut().insert(
        REASON_HEADER,
        HeaderValue::from_static(info.reason.as_str()),
    );
    if matches!(
        info.code,
        Some(IN_FLIGHT) | Some(CONNECTIONS) | Some(AGENT_CONNECTIONS)
    ) {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        resp.headers_mut().insert(
            PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"keyward\""),
        );
    }
    resp
}

/// `DenyInfo::code` of a `budget_exhausted` refusal for too many requests in flight.
pub const IN_FLIGHT: &str = "in_flight";
/// The same, for a task that holds as many connections as one task may.
pub const CONNECTIONS: &str = "connections";
/// The same, for a task whose agent's tasks hold as many connections as one agent's may.
pub const AGENT_CONNECTIONS: &str = "agent_connections";
/// `DenyInfo::code` of an `ambiguous_request` whose head is over `proxy.max_header_bytes`
/// (nothing of it was decided); answered 431.
pub const HEAD_TOO_LARGE: &str = "head_too_large";
/// `DenyInfo::code` of a `route_not_in_intent` refusal of a CONNECT (decided by host).
pub const AT_CONNECT: &str = "connect";
/// `DenyInfo::code` of an `invalid_token` refusal on a connection another task holds.
pub const OTHER_TASK: &str = "connection_of_another_task";
/// `DenyInfo::code` of a `secret_egress` refusal of a request carrying a task token.
pub const TASK_TOKEN: &str = "task_token";

/// The `DenyInfo::code` of a `secret_egress` refusal of a request carrying `carried`: task
/// tokens alone have a sentence of their own.
pub fn egress_code(carried: &[crate::credentials::Carried]) -> Option<&'static str> {
    carried
        .iter()
        .all(|c| *c == crate::credentials::Carried::TaskToken)
        .then_some(TASK_TOKEN)
}

/// What a suggested capability of risk tier `risk` (`high`, `critical`) lacks; also said by
/// `keyward explain`.
pub fn approval_note(risk: &str) -> String {
    format!("its risk is {risk}: it needs an approval, which keyward cannot grant yet")
}

fn detail(info: &DenyInfo<'_>) -> String {
    let ask = |what: &str| match info.hint {
        Some(Hint {
            name,
            approval: None,
        }) => {
            format!("{what} Capability `{name}` would allow it; ask for a task that includes it.")
        }
        Some(Hint {
            name,
            approval: Some(risk),
        }) => format!(
            "{what} Capability `{name}` would allow it, but {}.",
            approval_note(risk)
        ),
        None => format!("{what} No capability this agent may hold allows it."),
    };
    match info.reason {
        Reason::Allowed | Reason::Passthrough => String::new(),
        Reason::MissingCredentials => "Send Proxy-Authorization: Basic base64(TASK_ID:TOKEN), e.g. HTTPS_PROXY=http://TASK_ID:TOKEN@host:port.".into(),
        Reason::InvalidToken if info.code == Some(OTHER_TASK) => "This connection belongs to another task (the first to authenticate on it); send this task's requests on a connection of its own.".into(),
        Reason::InvalidToken => "The proxy credentials do not name a known task.".into(),
        Reason::TaskExpired => "The task has expired; mint a new one.".into(),
        Reason::TaskRevoked => "The task was revoked.".into(),
        Reason::UnknownHost if info.code == Some(OTHER_PORT) => "The host belongs to a configured service, but on another port or scheme (an `https` service is reached through CONNECT, an `http` one in absolute form).".into(),
        Reason::UnknownHost if info.code == Some(PASSTHROUGH_ONLY) => "The host is a passthrough host: it is reached only through CONNECT (a blind tunnel, e.g. an https:// URL through the proxy), not by a plain http:// request.".into(),
        Reason::UnknownHost => "The host is not a configured service or passthrough host.".into(),
        Reason::RouteNotInIntent if info.code == Some(AT_CONNECT) => match info.hint {
            // Decided by host alone: the capability named is one that reaches the host, not
            // necessarily the one the agent's request (not read yet) needs.
            Some(Hint { name, approval }) => format!(
                "No capability of the task's intent reaches this host (decided at CONNECT, before any request was read). Capability `{name}` reaches it{}; the capabilities a request needs can be checked with `keyward explain`.",
                approval
                    .map(|risk| format!(" ({})", approval_note(risk)))
                    .unwrap_or_default()
            ),
            None => "No capability of the task's intent reaches this host (decided at CONNECT, before any request was read), and no capability this agent may hold does.".into(),
        },
        Reason::RouteNotInIntent => ask("The request is not in the task's intent."),
        Reason::MethodNotAllowed => ask("The path is in the task's intent but this method is not."),
        Reason::ConstraintMismatch => match info.hint.map(|h| h.name) {
            Some(cap) => format!("A path parameter is outside the constraints the task was minted with for capability `{cap}`; ask for a task whose constraints include it."),
            None => "A path parameter is outside the constraints the task was minted with.".into(),
        },
        Reason::AmbiguousRequest => match info.code {
            Some(HEAD_TOO_LARGE) => "The request line and headers are larger than this proxy accepts (proxy.max_header_bytes); nothing of the request was decided.".into(),
            Some(code) => format!("The request could be read two ways ({code}); send it in canonical form."),
            None => "The request could be read two ways; send it in canonical form.".into(),
        },
        Reason::HostMismatch => "The request's Host or TLS server name differs from the tunnel's host.".into(),
        Reason::BlockedAddress => "The upstream resolves to a loopback, private, link-local or metadata address.".into(),
        Reason::BudgetExhausted if info.code == Some(IN_FLIGHT) => "The task has as many requests in flight as one task may (proxy.max_task_in_flight); retry when one completes.".into(),
        Reason::BudgetExhausted if info.code == Some(AGENT_CONNECTIONS) => "The agent's tasks hold as many proxy connections as one agent's may (proxy.max_agent_connections); reuse one, or retry when one closes.".into(),
        Reason::BudgetExhausted if info.code == Some(CONNECTIONS) => "The task holds as many proxy connections as one task may (proxy.max_task_connections); reuse one, or retry when one closes.".into(),
        Reason::BudgetExhausted => "The task has used all the requests it was minted with.".into(),
        Reason::ApprovalRequired => match info.hint {
            Some(Hint { name, approval }) => format!(
                "Capability `{name}` is {} risk and needs an approval.",
                approval.unwrap_or("high")
            ),
            None => "The capability's risk tier needs an approval.".into(),
        },
        Reason::SecretEgress if info.code == Some(TASK_TOKEN) => "The request carries a task token (in a header or the target); a token goes only in Proxy-Authorization, never upstream. Where an SDK wants an API key, give it any placeholder: keyward puts the real credential in.".into(),
        Reason::SecretEgress => "The request carries a real credential's value; it must never leave keyward.".into(),
        Reason::CredentialUnavailable => "The credential for this service cannot be read now; nothing was sent.".into(),
    }
}

/// Asks hyper to close the connection after this response (HTTP/1.1 `Connection: close`).
pub fn close_after(resp: &mut Response<ProxyBody>) {
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
}

/// SECURITY (I7): on the proxy listener, a client that has not shown a valid token does not
/// keep its connection (a 407, or anything refused before the token is looked at, such as an
/// origin-form request), or a few of them, asking once in a while, would hold every
/// connection place: no timeout fires on a connection that keeps sending complete heads. A
/// client that waited for the challenge sends its credentials on a new one.
pub fn close_unless_authenticated(
    resp: &mut Response<ProxyBody>,
    reason: Reason,
    task: Option<&str>,
) {
    if reason.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED || task.is_none() {
        close_after(resp);
    }
}

/// Failures that are not decisions (SPEC §4.3): the upstream could not be reached or answered
/// too slowly, or keyward itself failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// connect, DNS or TLS failure toward the upstream
    BadGateway,
    /// the upstream was reached but broke off, or answered with what keyward does not relay
    /// (malformed HTTP, an upgrade to something else than WebSocket, a coded body)
    BadUpstreamAnswer,
    /// the upstream coded (compressed) a credentialed answer though asked not to
    EncodedAnswer,
    /// the upstream did not answer in time
    GatewayTimeout,
    /// keyward cannot write audit records, or is shutting down
    Unavailable,
    /// the agent's request body broke on the way (malformed chunked encoding)
    BadRequestBody,
}

impl Failure {
    pub fn status(self) -> StatusCode {
        match self {
            Failure::BadGateway | Failure::BadUpstreamAnswer | Failure::EncodedAnswer => {
                StatusCode::BAD_GATEWAY
            }
            Failure::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Failure::BadRequestBody => StatusCode::BAD_REQUEST,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Failure::BadGateway => "upstream_unreachable",
            Failure::BadUpstreamAnswer | Failure::EncodedAnswer => "upstream_bad_answer",
            Failure::GatewayTimeout => "upstream_timeout",
            Failure::Unavailable => "unavailable",
            Failure::BadRequestBody => "bad_request_body",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Failure::BadGateway => "Upstream unreachable",
            Failure::BadUpstreamAnswer | Failure::EncodedAnswer => "Upstream answer not relayed",
            Failure::GatewayTimeout => "Upstream timed out",
            Failure::Unavailable => "keyward unavailable",
            Failure::BadRequestBody => "Malformed request body",
        }
    }

    fn detail(self) -> &'static str {
        match self {
            Failure::BadGateway => {
                "The upstream could not be reached or its TLS certificate could not be verified."
            }
            Failure::BadUpstreamAnswer => {
                "The upstream broke off, or answered with something keyward does not relay (not valid HTTP, an upgrade other than WebSocket, a compressed body it cannot check); nothing of it was passed on."
            }
            Failure::EncodedAnswer => {
                "The upstream compressed (or otherwise coded) its answer although keyward asked for none (Accept-Encoding: identity); keyward cannot check a coded body for the credential it injected, so nothing of it was passed on. The service must answer credentialed requests uncoded."
            }
            Failure::GatewayTimeout => "The upstream did not answer in time.",
            Failure::Unavailable => {
                "keyward cannot record decisions right now, so it refuses requests."
            }
            Failure::BadRequestBody => {
                "The request body broke off or was not valid HTTP framing; it was not sent whole."
            }
        }
    }
}

/// An upstream or internal failure, in the same problem shape (`task` when it is known).
pub fn failure(f: Failure, request_id: &str, task: Option<&str>) -> Response<ProxyBody> {
    let problem = Problem {
        kind: format!("urn:keyward:error:{}", f.code()),
        title: f.title(),
        status: f.status().as_u16(),
        detail: f.detail().to_string(),
        reason: f.code(),
        request_id,
        task,
        capability: None,
    };
    let mut resp = problem_response(f.status(), &problem);
    // The same header as a denial's, with the failure's code, so an agent reads one place.
    resp.headers_mut()
        .insert(REASON_HEADER, HeaderValue::from_static(f.code()));
    resp
}

fn problem_response(status: StatusCode, problem: &Problem<'_>) -> Response<ProxyBody> {
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail_of(reason: Reason, hint: Option<Hint<'_>>, code: Option<&'static str>) -> String {
        detail(&DenyInfo {
            reason,
            request_id: "r",
            task: Some("t"),
            hint,
            code,
        })
    }

    // A capability that needs an approval is never offered as if a task that includes it
    // would do, and its tier is named as it is (`critical` is not "high").
    #[test]
    fn a_suggested_capability_that_needs_an_approval_says_so() {
        let plain = Hint {
            name: "a.read",
            approval: None,
        };
        let critical = Hint {
            name: "a.drop",
            approval: Some("critical"),
        };
        let asked = detail_of(Reason::RouteNotInIntent, Some(plain), None);
        assert!(asked.contains("ask for a task that includes it"), "{asked}");
        for (reason, code) in [
            (Reason::RouteNotInIntent, None),
            (Reason::MethodNotAllowed, None),
            (Reason::RouteNotInIntent, Some(AT_CONNECT)),
        ] {
            let said = detail_of(reason, Some(critical), code);
            assert!(said.contains("`a.drop`"), "{said}");
            assert!(said.contains("its risk is critical"), "{said}");
            assert!(!said.contains("ask for a task"), "{said}");
        }
        let said = detail_of(Reason::ApprovalRequired, Some(critical), None);
        assert!(said.contains("is critical risk"), "{said}");
        let said = detail_of(Reason::RouteNotInIntent, Some(plain), Some(AT_CONNECT));
        assert!(said.contains("decided at CONNECT"), "{said}");
    }
}
