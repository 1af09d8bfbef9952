//! One request's way through keyward, top to bottom:
//! identify → target → decide → inject → forward → record.
//!
//! Every path out of `handle` writes exactly one audit record: a refusal before it is answered,
//! an allowed request when its response body ends (see `record::Recorder`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Method, Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::sync::Notify;

use crate::credentials::{self, Carried};
use crate::decide::{self, Denial, RequestFacts};
use crate::policy::{Injection, ProxySettings};
use crate::proxy::body::{CountingBody, ProxyBody, Upload};
use crate::proxy::connect;
use crate::proxy::forward::{self, UpstreamError};
use crate::proxy::identify::{self, Target, TargetError, TunnelHost};
use crate::proxy::record::RecordDraft;
use crate::proxy::redact::Redactor;
use crate::proxy::respond::{self, DenyInfo, Failure};
use crate::proxy::upgrade;
use crate::reason::Reason;
use crate::state::{Generation, State};
use crate::tasks::{ConnectionsFull, DenialPace, Task};

/// Where a request came from.
#[derive(Clone)]
pub struct ConnCtx {
    pub client: SocketAddr,
    /// The connection's place under `max_connections`, held by everything the connection
    /// hands work to (tunnels, WebSocket relays) so they count until they end.
    pub slot: ConnSlot,
    /// Set inside an intercepted tunnel: identity and destination are fixed by the CONNECT.
    pub tunnel: Option<TunnelCtx>,
    /// What the agent's side of the connection has done (HTTP/1: its end of stream).
    pub agent: Arc<crate::proxy::conn::AgentSide>,
}

pub type ConnSlot = Arc<ConnPlace>;

/// A connection's place under `max_connections`, and the task that holds it: the first task
/// that authenticates on it (a CONNECT's task, for the tunnel it becomes). One task holds at
/// most `max_task_connections` places, so it cannot take every place from the others.
pub struct ConnPlace {
    _permit: tokio::sync::OwnedSemaphorePermit,
    holder: std::sync::OnceLock<crate::tasks::ConnectionHold>,
}

impl ConnPlace {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit) -> ConnPlace {
        ConnPlace {
            _permit: permit,
            holder: std::sync::OnceLock::new(),
        }
    }

    /// Counts the connection against `task` if no task holds it yet. `None` when `task` may
    /// use it; else why not: another task holds it (SECURITY, I3: a connection's identity is
    /// fixed, on the plain listener as in a tunnel, so no task rides a place another holds),
    /// or `task` holds all the places it may.
    pub fn claim(
        &self,
        task: &Arc<Task>,
        settings: &ProxySettings,
    ) -> Option<(Reason, &'static str)> {
        if let Some(hold) = self.holder.get() {
            return (hold.task().serial != task.serial)
                .then_some((Reason::InvalidToken, respond::OTHER_TASK));
        }
        match task.hold_connection(
            settings.task_connections_limit(),
            settings.agent_connections_limit(),
        ) {
            Ok(hold) => {
                // Requests on one connection are handled one at a time (HTTP/1.1), so no
                // other claim can have won meanwhile; if one did, this hold is dropped.
                let _ = self.holder.set(hold);
                None
            }
            Err(ConnectionsFull::Task) => Some((Reason::BudgetExhausted, respond::CONNECTIONS)),
            Err(ConnectionsFull::Agent) => {
                Some((Reason::BudgetExhausted, respond::AGENT_CONNECTIONS))
            }
        }
    }

    /// Whether the connection stays open after a refusal of `task`'s request: `task` holds it
    /// and has not ended. Not when no task holds it (its first refusal closes it), another
    /// task does (a request checked before its claim: `secret_egress`), or the holder ended.
    pub fn kept_by(&self, task: Option<&Arc<Task>>) -> bool {
        match (self.holder.get(), task) {
            (Some(hold), Some(task)) => {
                hold.task().serial == task.serial
                    && task.ended_at(std::time::SystemTime::now()).is_none()
            }
            _ => false,
        }
    }

    /// SECURITY (I7): a denial on a connection a task holds waits out that task's denial
    /// pace (`Task::pace_denial`; shutdown cuts the wait short). Returns whether the
    /// connection is to close after it: the task has as many denials waiting as it may, so
    /// each further one costs it a new connection.
    pub async fn pace_denial(&self, state: &State) -> bool {
        let Some(hold) = self.holder.get() else {
            return false;
        };
        let settings = &state.settings;
        let pace = hold.task().pace_denial(
            settings.max_task_denials_per_second,
            settings.max_task_in_flight,
        );
        match pace {
            DenialPace::Now => false,
            DenialPace::Wait(wait, _waiting) => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = state.stopped() => {}
                }
                false
            }
            DenialPace::Flooding => true,
        }
    }
}

#[derive(Clone)]
pub struct TunnelCtx {
    pub task: Arc<Task>,
    pub host: TunnelHost,
    /// The service the CONNECT host belongs to (named in the records of early refusals).
    pub service: Option<String>,
    /// Notified to close the tunnel after an authentication failure (SPEC §4.2).
    pub close: Arc<Notify>,
    /// One permit, held by the WebSocket relay the tunnel's connection became (if any): the
    /// tunnel's own record waits for it, since the tunnel stays open as that relay.
    pub relay: Arc<tokio::sync::Semaphore>,
    /// The agent speaks HTTP/2 in the tunnel (ALPN `h2`), else HTTP/1.1.
    pub h2: bool,
    /// Turns true when the tunnel's task is revoked or expires (`conn::serve_intercepted`).
    pub cut: tokio::sync::watch::Receiver<bool>,
}

/// The service function of both listeners. Never fails toward hyper.
pub async fn handle(
    state: Arc<State>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.method() == Method::CONNECT && ctx.tunnel.is_none() {
        return Ok(connect::handle(state, &ctx, req).await);
    }
    Ok(answer(state, &ctx, req).await)
}

/// The service function inside an intercepted tunnel (CONNECT there is refused as ambiguous).
pub async fn handle_in_tunnel(
    state: Arc<State>,
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    Ok(answer(state, &ctx, req).await)
}

/// `handle_request`'s answer, without a body for a `HEAD` (its `Content-Length` stays, as
/// RFC 9110 §9.3.2 allows). HTTP/1.1 drops one by itself; HTTP/2 would send keyward's problem
/// document as DATA, a protocol error that hides the refusal from the agent.
async fn answer(state: Arc<State>, ctx: &ConnCtx, req: Request<Incoming>) -> Response<ProxyBody> {
    let head = req.method() == Method::HEAD;
    let resp = handle_request(state, ctx, req).await;
    match head {
        true => resp.map(|body| match body {
            ProxyBody::Full(_) => ProxyBody::empty(),
            upstream => upstream,
        }),
        false => resp,
    }
}

/// A refusal decided before anything left keyward.
struct Refusal {
    denial: Denial,
    code: Option<&'static str>,
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Self {
        Refusal { denial, code: None }
    }
}

impl From<Reason> for Refusal {
    fn from(reason: Reason) -> Self {
        Denial::bare(reason).into()
    }
}

impl From<TargetError> for Refusal {
    fn from(e: TargetError) -> Self {
        Refusal {
            denial: Denial::bare(e.reason),
            code: Some(e.code),
        }
    }
}

async fn handle_request(
    state: Arc<State>,
    ctx: &ConnCtx,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let generation = state.current();
    let mut draft = RecordDraft::new(&state, ctx.client, generation.policy.version());
    if ctx.tunnel.is_some() {
        draft.rec.scheme = crate::policy::Scheme::Https.as_str();
    }
    if !state.audit.accepting() {
        // SECURITY: no record, no request (fail closed).
        return respond::failure(
            Failure::Unavailable,
            draft.request_id(),
            draft.rec.task.as_deref(),
        );
    }
    let (mut parts, body) = req.into_parts();
    draft.rec.method = parts.method.as_str().to_string();
    draft.rec.path = parts.uri.path().to_string();
    // (A tunnel whose task has ended answers 407 first, whatever the head: SPEC §4.2.)
    let ended = |t: &TunnelCtx| t.task.ended_at(SystemTime::now()).is_some();
    if identify::head_len(&parts.method, &parts.uri, &parts.headers)
        > state.settings.max_header_bytes
        && !ctx.tunnel.as_ref().is_some_and(ended)
    {
        // Nothing of it is decided; inside a tunnel its task and host are known all the same,
        // and its refusals are paced as the task's others are (`refuse`).
        draft.rec.outcome = Some(respond::HEAD_TOO_LARGE);
        if let Some(t) = &ctx.tunnel {
            draft.set_task(&t.task);
        }
        // A leak is named all the same (the head is bounded by the parser's buffer). Its
        // `Proxy-Authorization` is scanned too: a task token there is not looked for.
        let carried = generation.credentials.carried_by(
            &parts.method,
            &parts.uri,
            &parts.headers,
            &state.tasks,
            false,
        );
        let refusal = if carried.is_empty() {
            Refusal {
                denial: Denial::bare(Reason::AmbiguousRequest),
                code: Some(respond::HEAD_TOO_LARGE),
            }
        } else {
            draft.rec.outcome = None;
            egress_refusal(&generation, ctx, &parts, &mut draft, &carried)
        };
        return refuse(&state, &generation, ctx, draft, refusal).await;
    }

    let prepared = prepare(&state, &generation, ctx, &mut parts, &mut draft);
    let Prepared {
        task,
        target,
        permit,
        websocket,
    } = match prepared {
        Ok(p) => p,
        Err(refusal) => {
            // Only on a connection the request's own live task holds: one that shows no valid
            // token must give its place up at once (a full listener evicts them), not after a
            // drain, or clients without a token could keep agents out.
            if stays_open(ctx, &draft) {
                drain_refused(&parts, body).await;
            }
            return refuse(&state, &generation, ctx, draft, refusal).await;
        }
    };
    // The agent side of a WebSocket upgrade stays here; it never travels upstream.
    let agent_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    // A relay is decided again at each reload (`State::until_disallowed`).
    let ws_method = websocket.then(|| parts.method.clone());

    // Inject (hop-by-hop already gone) and aim at the decided destination.
    let injected = match credentials::inject(
        &mut parts,
        &permit,
        &generation.policy,
        &generation.credentials,
    ) {
        Ok(c) => c,
        Err(reason) => {
            task.refund();
            // The record names the credential that could not be read (never its value).
            let service = generation.policy.service_at(permit.service());
            draft.rec.credential = service
                .inject
                .as_ref()
                .and_then(|how| generation.credentials.name(how.credential()))
                .map(str::to_string);
            return refuse(&state, &generation, ctx, draft, reason.into()).await;
        }
    };
    let mut redactor = None;
    if let Some(inj) = &injected {
        draft.rec.credential = generation
            .credentials
            .name(inj.credential)
            .map(str::to_string);
        if let Some(how) = &generation.policy.service_at(permit.service()).inject {
            redactor = Some(Box::new(Redactor::for_injection(how, inj.value.clone())));
            // SECURITY (I4): ask for an identity-encoded response, so a reflected credential
            // cannot hide from the redactor inside a compressed body.
            parts.headers.insert(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
            // SECURITY (I4): nor split across byte ranges: the agent could ask for a
            // reflected credential in two pieces (two requests, or one multipart answer),
            // neither of which the redactor would recognize.
            forward::strip_ranges(&mut parts.headers);
            // SECURITY (I4): nor compressed inside a WebSocket (permessage-deflate): the
            // upstream's messages are redacted too (`ws_redact`), so no extension is offered.
            if websocket {
                parts.headers.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
            }
        }
    }
    drop(injected);
    let head_only = parts.method == Method::HEAD;

    let upload = Arc::new(Upload::default());
    let counted = CountingBody::new(body, upload.clone(), Some(task.clone()));
    let mut up = Request::from_parts(parts, Either::Left(counted));
    if forward::aim(&mut up, &target).is_none() {
        task.refund();
        return refuse(
            &state,
            &generation,
            ctx,
            draft,
            Reason::AmbiguousRequest.into(),
        )
        .await;
    }

    let started = Instant::now();
    draft.arm(&state, Reason::Allowed, Some(&upload));
    let sending = forward::send(
        &generation.upstreams,
        permit.service(),
        task.serial,
        up,
        state.settings.upstream_timeout,
    );
    // SECURITY: a task revoked or expired while its request was out gets no answer (not
    // even the head), and an upload still going is cut (`CountingBody`; a paused one here:
    // the request is dropped, which resets its stream or closes its connection).
    // Inside a tunnel, expiry too is told at once (its connection watches the task anyway).
    let tunnel_cut = async {
        let cut = match ctx.tunnel.as_ref().map(|t| t.cut.clone()) {
            Some(mut cut) => cut.wait_for(|cut| *cut).await.is_ok(),
            None => false,
        };
        if !cut {
            std::future::pending::<()>().await;
        }
    };
    // (One wait on the task, not two: a tunnel's cut says revocations too.) An agent that
    // ends its side during this wait went away (`conn::AgentSide`); after it, what keyward
    // answers (a 502, the response) is still written to one that only half-closed.
    let sent = {
        let _waiting = ctx.agent.awaiting_upstream().await;
        tokio::select! {
            biased;
            sent = sending => Some(sent),
            () = task.revoked_by_operator(), if ctx.tunnel.is_none() => None,
            () = tunnel_cut, if ctx.tunnel.is_some() => None,
        }
    };
    let ended = match &sent {
        None => Some(
            task.cut_at(SystemTime::now())
                .unwrap_or(crate::tasks::TaskEnd::Revoked),
        ),
        Some(sent) => upload
            .cut_by()
            .or_else(|| task.cut_at(SystemTime::now()).filter(|_| sent.is_ok())),
    };
    let (Some(sent), None) = (sent, ended) else {
        let end = ended.unwrap_or(crate::tasks::TaskEnd::Revoked);
        return ended_in_flight(&state, ctx, draft, end, started, &upload).await;
    };
    match sent {
        Ok(mut resp) => {
            let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
            if switching {
                // SPEC §4.5: only a real switch to WebSocket is relayed; a `101` to anything
                // else (or to nothing named) would open a raw channel the agent did not ask for.
                let to_websocket = resp
                    .headers()
                    .get_all(http::header::UPGRADE)
                    .iter()
                    .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
                let asked = agent_upgrade.filter(|_| websocket && to_websocket);
                // SECURITY (I4): an extension keyward did not offer (it offers none on a
                // credentialed upgrade) could hide a message from the redactor.
                let unoffered = redactor.is_some()
                    && resp
                        .headers()
                        .contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS);
                let Some(agent_upgrade) = asked.filter(|_| !unoffered) else {
                    // An upgrade nobody asked for is a broken upstream, not something to relay.
                    let service = draft.rec.service.clone().unwrap_or_default();
                    state.metrics.upstream_error(&service, "protocol");
                    draft.rec.outcome = Some(if unoffered && websocket && to_websocket {
                        "websocket_extension"
                    } else {
                        "unexpected_upgrade"
                    });
                    let resp = respond::failure(
                        Failure::BadUpstreamAnswer,
                        draft.request_id(),
                        draft.rec.task.as_deref(),
                    );
                    draft.write(&state, Reason::Allowed, 502).await;
                    return resp;
                };
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let _ = forward::strip_hop_by_hop(resp.headers_mut());
                upgrade::mark_upgrade(resp.headers_mut());
                if let Some(r) = redactor.as_mut() {
                    forward::strip_session_grants(resp.headers_mut());
                    r.headers(resp.headers_mut());
                }
                let recorder = draft.into_recorder(state.clone(), 101, started, upload);
                let slot = ctx.slot.clone();
                let shutdown = state.shutdown_signal();
                let task = task.clone();
                let redactor = redactor.take();
                // The agent's connection lives on as the relay (its HTTP serving has ended):
                // still counted as open, under the kind it came as.
                let open = state.metrics.connection_opened(match ctx.tunnel {
                    Some(_) => crate::metrics::ConnKind::Intercepted,
                    None => crate::metrics::ConnKind::Http,
                });
                let in_tunnel = ctx
                    .tunnel
                    .as_ref()
                    .and_then(|t| t.relay.clone().try_acquire_owned().ok());
                let method = ws_method.unwrap_or(http::Method::GET);
                tokio::spawn(async move {
                    let (_slot, _open, _in_tunnel) = (slot, open, in_tunnel);
                    // An open channel, not a request that finishes under the policy it
                    // started with: it ends when a reload no longer allows its upgrade.
                    let still_allowed = |g: &crate::state::Generation| {
                        let facts = RequestFacts {
                            scheme: target.scheme,
                            host: &target.host,
                            port: target.port,
                            method: &method,
                            path: &target.path,
                        };
                        decide::decide(&g.policy, &task, &facts, SystemTime::now()).is_ok()
                    };
                    let ends = upgrade::Ends {
                        task: &task,
                        shutdown,
                        disallowed: state.until_disallowed(still_allowed),
                    };
                    upgrade::relay(agent_upgrade, upstream_upgrade, recorder, ends, redactor).await
                });
                let mut out = Response::new(ProxyBody::empty());
                *out.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                *out.headers_mut() = std::mem::take(resp.headers_mut());
                return out;
            }
            let status = resp.status();
            let bodyless = head_only
                || status == http::StatusCode::NO_CONTENT
                || status == http::StatusCode::NOT_MODIFIED;
            if redactor.is_some() && !bodyless && forward::is_encoded(resp.headers()) {
                // SECURITY (I4): keyward asked for `identity`; a compressed (or otherwise
                // coded) body could carry the reflected credential past the redactor, and the
                // agent can decode it. Not relayed (checked before Transfer-Encoding is
                // stripped as hop-by-hop: `gzip, chunked` is a coding too).
                let service = draft.rec.service.clone().unwrap_or_default();
                state.metrics.upstream_error(&service, "protocol");
                draft.rec.upstream_ms = Some(crate::audit::millis(started.elapsed()));
                draft.rec.outcome = Some("encoded_response");
                let resp = respond::failure(
                    Failure::EncodedAnswer,
                    draft.request_id(),
                    draft.rec.task.as_deref(),
                );
                draft.write(&state, Reason::Allowed, 502).await;
                return resp;
            }
            // Read before redaction may drop it (and before `Transfer-Encoding` goes as
            // hop-by-hop: with it, a `Content-Length` means nothing).
            let declared = (!bodyless
                && !resp.headers().contains_key(http::header::TRANSFER_ENCODING))
            .then(|| forward::content_length(resp.headers()))
            .flatten();
            let _ = forward::strip_hop_by_hop(resp.headers_mut());
            // SECURITY: `Alt-Svc` invites the agent's client to reach the origin another way
            // (HTTP/3 over UDP, another port), around keyward and its decisions.
            resp.headers_mut().remove(http::header::ALT_SVC);
            if let Some(r) = redactor.as_mut() {
                // SECURITY (I4): an upstream that reflects the credential must not hand it over.
                // hyper relays a non-canonical reason phrase it read; the agent gets the
                // canonical one instead (a reflected credential could hide there).
                resp.extensions_mut().remove::<hyper::ext::ReasonPhrase>();
                forward::strip_session_grants(resp.headers_mut());
                // Ranges were not asked for (`strip_ranges`), so none are offered either: a
                // download tool would resume by appending the whole answer to its partial file.
                resp.headers_mut().remove(http::header::ACCEPT_RANGES);
                r.headers(resp.headers_mut());
                // Redaction may change the body's length, so its framing is left to hyper.
                if !bodyless {
                    resp.headers_mut().remove(http::header::CONTENT_LENGTH);
                }
            }
            forward::name_unknown_status(&mut resp);
            let recorder = draft.into_recorder(state.clone(), status.as_u16(), started, upload);
            let (parts, body) = resp.into_parts();
            // An upstream whose head ended its stream (HTTP/2 HEADERS with END_STREAM: gRPC's
            // trailers-only answer, its status in the head) gets the same from keyward: an
            // empty DATA frame after it is an answer without trailers to a gRPC client.
            let ended =
                hyper::body::Body::is_end_stream(&body) && declared.map_or(true, |n| n == 0);
            if bodyless || ended {
                // The head is the whole answer (HEAD, 204, 304): hyper never reads a body for
                // it, so whatever an upstream sends after it (HTTP/2 DATA) is not relayed and
                // the record is complete now.
                let found = redactor.as_ref().map_or(0, |r| r.found());
                recorder.complete(0, "completed", found);
                return Response::from_parts(parts, ProxyBody::empty());
            }
            Response::from_parts(
                parts,
                ProxyBody::upstream(body, recorder, redactor, declared),
            )
        }
        Err(UpstreamError::Blocked) => {
            task.refund();
            // Nothing was sent: the record must not say a credential went out.
            draft.rec.credential = None;
            refuse(
                &state,
                &generation,
                ctx,
                draft,
                Reason::BlockedAddress.into(),
            )
            .await
        }
        // The agent's own body broke (malformed chunking, a hang-up mid-body): its fault, not
        // the upstream's, so no 502 and no upstream error counted. An agent that went away is
        // recorded as such (`client_closed`, 499), not as one that sent a malformed body.
        Err(UpstreamError::Failed { .. }) if upload.agent_failed() => {
            draft.rec.upstream_ms = Some(crate::audit::millis(started.elapsed()));
            draft.rec.bytes_up = upload.bytes();
            // (An HTTP/2 upload the drain's end cut reads as a hang-up too: keyward's doing.)
            let (outcome, status) = crate::proxy::record::cut_short(&state, Some(&upload));
            draft.rec.outcome = Some(outcome);
            let resp = respond::failure(
                Failure::BadRequestBody,
                draft.request_id(),
                draft.rec.task.as_deref(),
            );
            draft.write(&state, Reason::Allowed, status).await;
            resp
        }
        Err(e) => {
            let (failure, kind, why) = match e {
                UpstreamError::Timeout => (
                    Failure::GatewayTimeout,
                    "timeout",
                    "no response head within proxy.upstream_timeout".to_string(),
                ),
                UpstreamError::Failed { kind, why } => {
                    let failure = match kind {
                        "protocol" => Failure::BadUpstreamAnswer,
                        _ => Failure::BadGateway,
                    };
                    (failure, kind, why)
                }
                UpstreamError::Blocked => (Failure::BadGateway, "blocked", String::new()),
            };
            let service = draft.rec.service.clone().unwrap_or_default();
            // The agent is told only that it failed; the operator learns why. The text can hold
            // what the upstream chose (an HTTP/2 GOAWAY's debug data): the credential it may
            // echo is redacted, and the text bounded.
            let mut why = match &redactor {
                Some(r) => r.scrub(&why),
                None => why,
            };
            if let Some((cut, _)) = why.char_indices().nth(MAX_LOGGED_ERROR) {
                why.truncate(cut);
                why.push('…');
            }
            tracing::warn!(
                request_id = %draft.request_id(),
                service = %service,
                host = %draft.rec.host,
                kind,
                error = %why,
                "upstream request failed"
            );
            state.metrics.upstream_error(&service, kind);
            draft.rec.upstream_ms = Some(crate::audit::millis(started.elapsed()));
            draft.rec.bytes_up = upload.bytes();
            draft.rec.outcome = Some(kind);
            let resp = respond::failure(failure, draft.request_id(), draft.rec.task.as_deref());
            draft
                .write(&state, Reason::Allowed, failure.status().as_u16())
                .await;
            resp
        }
    }
}

/// Characters of an upstream error's text that are logged.
const MAX_LOGGED_ERROR: usize = 512;

/// Everything up to the point where the request may leave: identify, read the target, decide,
/// charge the budget, strip hop-by-hop headers. No I/O happens here.
fn prepare(
    state: &State,
    generation: &Generation,
    ctx: &ConnCtx,
    parts: &mut http::request::Parts,
    draft: &mut RecordDraft,
) -> Result<Prepared, Refusal> {
    let now = SystemTime::now();
    let identified = match &ctx.tunnel {
        Some(t) => Ok(t.task.clone()),
        None => {
            // SECURITY: an origin-form request (`GET /metrics`) is not a proxy request: 400
            // before anything else, whoever asks, so the proxy listener never looks like the
            // admin API (or asks for credentials it would not use).
            if parts.uri.authority().is_none() {
                return Err(TargetError {
                    reason: Reason::AmbiguousRequest,
                    code: "not_absolute_form",
                }
                .into());
            }
            // The record of a refused request still names where it was aimed, even when the
            // refusal is a 407 (lowercased; scrubbed like every refused field).
            let host = parts.uri.host().unwrap_or("").to_ascii_lowercase();
            let https = parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let port = parts.uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            draft.set_host(&host, port);
            state.tasks.authenticate(&parts.headers)
        }
    };
    if let Ok(task) = &identified {
        draft.set_task(task);
    }
    if let Some(t) = &ctx.tunnel {
        draft.set_host(&t.host.host, t.host.port);
    }
    // SECURITY: a real secret in the agent's hands has leaked; never let it travel. Looked
    // for first, so that a leak is named even in a request refused for another reason too
    // (no token, a wrong one, an ended task's).
    let carried = generation.credentials.carried_by(
        &parts.method,
        &parts.uri,
        &parts.headers,
        &state.tasks,
        ctx.tunnel.is_none() && identified.is_ok(),
    );
    if !carried.is_empty() {
        return Err(egress_refusal(generation, ctx, parts, draft, &carried));
    }
    let task = identified?;
    decide::check_validity(&task, now)?;
    if let Some((reason, code)) = ctx.slot.claim(&task, &state.settings) {
        return Err(Refusal {
            denial: Denial::bare(reason),
            code: Some(code),
        });
    }
    let target = match &ctx.tunnel {
        Some(t) => identify::tunnel_target(parts, &t.host)?,
        None => identify::absolute_target(parts)?,
    };
    draft.set_target(
        parts.method.as_str(),
        target.scheme,
        &target.host,
        target.port,
        target.path.raw_path(),
    );
    let facts = RequestFacts {
        scheme: target.scheme,
        host: &target.host,
        port: target.port,
        method: &parts.method,
        path: &target.path,
    };
    let permit = decide::decide(&generation.policy, &task, &facts, now).map_err(|d| {
        draft.set_denial(&generation.policy, &d);
        Refusal::from(d)
    })?;
    draft.set_permit(&generation.policy, &permit);

    if !forward::canonical_content_length(&mut parts.headers) {
        return Err(Refusal {
            denial: Denial::bare(Reason::AmbiguousRequest),
            code: Some("content_length"),
        });
    }
    let websocket = upgrade::wants_websocket(parts);
    let trailers = forward::strip_hop_by_hop(&mut parts.headers);
    if trailers {
        // keyward relays trailers, and gRPC servers refuse a request without it.
        parts
            .headers
            .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    }
    if websocket {
        upgrade::mark_upgrade(&mut parts.headers);
    } else if trailers {
        // RFC 9110 §10.1.4: `TE` is named in `Connection` (hyper drops both words for HTTP/2).
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("te"),
        );
    }
    match &generation.policy.service_at(permit.service()).inject {
        // SECURITY: `X_Api_Key` beside `X-Api-Key` may be merged by some servers.
        Some(Injection::Header { name, .. }) if has_lookalike(&parts.headers, name) => {
            return Err(Refusal {
                denial: Denial::bare(Reason::AmbiguousRequest),
                code: Some("header_lookalike"),
            });
        }
        // SECURITY: the same for a query parameter: `API_KEY` or `api.key` beside `api_key`.
        Some(Injection::Query { param, .. })
            if parts
                .uri
                .query()
                .is_some_and(|q| identify::query_lookalike(q, param)) =>
        {
            return Err(Refusal {
                denial: Denial::bare(Reason::AmbiguousRequest),
                code: Some("query_lookalike"),
            });
        }
        _ => {}
    }
    // I7: one task's flood waits on its own places, never on everyone's.
    let Some(slot) = task.enter(state.settings.max_task_in_flight) else {
        return Err(Refusal {
            denial: Denial::bare(Reason::BudgetExhausted),
            code: Some(respond::IN_FLIGHT),
        });
    };
    draft.in_flight = Some(slot);
    if !task.try_consume() {
        return Err(Reason::BudgetExhausted.into());
    }
    Ok(Prepared {
        task,
        target,
        permit,
        websocket,
    })
}

/// A request that may leave: its task, destination, permit, and whether it upgrades.
struct Prepared {
    task: Arc<Task>,
    target: Target,
    permit: decide::Permit,
    websocket: bool,
}

/// The `secret_egress` refusal of a request that carried `carried`, before its target was
/// read: recorded as it came (scrubbed when written), named, and counted under the host's
/// service when only one serves it.
fn egress_refusal(
    generation: &Generation,
    ctx: &ConnCtx,
    parts: &http::request::Parts,
    draft: &mut RecordDraft,
    carried: &[Carried],
) -> Refusal {
    draft.set_egress(carried);
    let scheme = match (&ctx.tunnel, parts.uri.scheme_str()) {
        (None, Some("http")) => crate::policy::Scheme::Http,
        _ => crate::policy::Scheme::Https,
    };
    let (host, port) = (draft.rec.host.clone(), draft.rec.port.unwrap_or(0));
    draft.set_target(parts.method.as_str(), scheme, &host, port, parts.uri.path());
    let service = generation
        .policy
        .host_table(scheme, &host, port)
        .and_then(|t| t.sole_service);
    draft.set_match(&generation.policy, service, None, None);
    Refusal {
        denial: Denial::bare(Reason::SecretEgress),
        code: respond::egress_code(carried),
    }
}

fn has_lookalike(headers: &http::HeaderMap, injected: &http::HeaderName) -> bool {
    let want = injected.as_str();
    headers
        .keys()
        .any(|k| k.as_str() != want && forward::spelt_as(k.as_str(), want))
}

/// Records a refusal, then answers it. Authentication failures inside a tunnel close it.
async fn refuse(
    state: &State,
    generation: &Generation,
    ctx: &ConnCtx,
    mut draft: RecordDraft,
    refusal: Refusal,
) -> Response<ProxyBody> {
    let reason = refusal.denial.reason;
    if let Some(t) = &ctx.tunnel {
        // Refused before the target was read: the record still names what the CONNECT fixed.
        if draft.rec.host.is_empty() {
            draft.set_host(&t.host.host, t.host.port);
        }
        if draft.rec.service.is_none() {
            draft.rec.service = t.service.clone();
        }
    }
    let (hint, code) = respond::explain(
        &generation.policy,
        &refusal.denial,
        refusal.code,
        &draft.rec.host,
    );
    draft.rec.detail = code;
    let task = draft.rec.task.clone();
    let mut resp = respond::deny(&DenyInfo {
        reason,
        request_id: draft.request_id(),
        task: task.as_deref(),
        hint,
        code,
    });
    // A 407 ends its connection (SPEC §4.2), and so does any refusal on a connection its
    // request's task does not hold alive (`stays_open`).
    let kept = reason.status() != http::StatusCode::PROXY_AUTHENTICATION_REQUIRED
        && stays_open(ctx, &draft);
    // (The response's status: a head too large is 431, not the reason's 400.)
    draft.write(state, reason, resp.status().as_u16()).await;
    // Recorded first: an agent that hangs up while its refusal waits still leaves the record
    // (and the connection's next request is read only after the answer, so the records are
    // paced all the same).
    let flooding = ctx.slot.pace_denial(state).await;
    match &ctx.tunnel {
        // A flooding tunnel is closed and this refusal held, unanswered, until it is gone
        // (`conn::CLOSE_GRACE`): an HTTP/2 client opened streams, each refused and recorded
        // at once, for as long as the graceful close took; held, they count against its
        // concurrent streams instead.
        Some(t) if flooding => {
            t.close.notify_one();
            return std::future::pending().await;
        }
        Some(_) if !kept => end_connection(ctx, &mut resp),
        Some(_) => {}
        None => {
            respond::close_unless_authenticated(&mut resp, reason, task.as_deref());
            if flooding || !kept {
                respond::close_after(&mut resp);
            }
        }
    }
    resp
}

/// Whether a connection stays open after refusing a request: its request's own task holds it
/// (the tunnel's task, or the plain connection it claimed) and has not ended. Not one no task
/// holds (its task holds all the connections it may), another task's, or an ended task's
/// (which answers one request, then closes: SPEC §4.2).
fn stays_open(ctx: &ConnCtx, draft: &RecordDraft) -> bool {
    match &ctx.tunnel {
        Some(t) => t.task.ended_at(SystemTime::now()).is_none(),
        None => ctx.slot.kept_by(draft.task()),
    }
}

/// How much of a refused request's body is read (and dropped) before the refusal is sent, and
/// for how long at most.
const DRAIN_BYTES: usize = 8 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what is left of a refused HTTP/1 request's body, within `DRAIN_BYTES` and
/// `DRAIN_TIME`: a client that writes its whole upload before it reads (most HTTP/1 clients)
/// would else meet a connection closed with its bytes unread, which the kernel answers with a
/// reset that can take the refusal with it, and the agent would see a network error instead of
/// why. Not when the client waits for `100 Continue` (reading would invite the body), nor over
/// HTTP/2 (a stream reset stops the upload alone). None of it goes anywhere.
async fn drain_refused(parts: &http::request::Parts, mut body: Incoming) {
    use http_body_util::BodyExt as _;
    let continues = parts
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if parts.version > http::Version::HTTP_11
        || continues
        || hyper::body::Body::is_end_stream(&body)
    {
        return;
    }
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            let read = frame.data_ref().map_or(0, |d| d.len());
            left = left.saturating_sub(read);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// A 407 ends the connection it is sent on, inside a tunnel the tunnel (SPEC §4.2), gracefully:
/// HTTP/1.1 answers with `Connection: close` (said here: hyper adds it only if the close
/// reaches the connection before the answer's head is written), HTTP/2 sends GOAWAY after it.
fn end_connection(ctx: &ConnCtx, resp: &mut Response<ProxyBody>) {
    match &ctx.tunnel {
        Some(t) => {
            if !t.h2 {
                respond::close_after(resp);
            }
            t.close.notify_one();
        }
        None => respond::close_after(resp),
    }
}

/// The answer to an allowed request whose task ended (revoked, expired) while it was out: the
/// 407 a new request would get, and a record of the allowed request with how it was cut.
async fn ended_in_flight(
    state: &State,
    ctx: &ConnCtx,
    mut draft: RecordDraft,
    end: crate::tasks::TaskEnd,
    started: Instant,
    upload: &Upload,
) -> Response<ProxyBody> {
    let reason = match end {
        crate::tasks::TaskEnd::Revoked => Reason::TaskRevoked,
        crate::tasks::TaskEnd::Expired => Reason::TaskExpired,
    };
    draft.rec.upstream_ms = Some(crate::audit::millis(started.elapsed()));
    draft.rec.bytes_up = upload.bytes();
    draft.rec.outcome = Some(end.as_str());
    let task = draft.rec.task.clone();
    let mut resp = respond::deny(&DenyInfo {
        reason,
        request_id: draft.request_id(),
        task: task.as_deref(),
        hint: None,
        code: None,
    });
    end_connection(ctx, &mut resp);
    draft
        .write(state, Reason::Allowed, reason.status().as_u16())
        .await;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookalike_headers_are_found() {
        let name = http::HeaderName::from_static("x-api-key");
        // lighttpd's CGI and FastCGI turn every character but letters and digits into `_`.
        for spelling in ["x_api_key", "x.api.key", "x~api-key", "x_api.key"] {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(spelling.as_bytes()).unwrap(),
                "a".parse().unwrap(),
            );
            assert!(has_lookalike(&h, &name), "{spelling}");
        }
        let mut ok = http::HeaderMap::new();
        ok.insert("x-api-key", "a".parse().unwrap());
        ok.insert("x-api-keys", "a".parse().unwrap());
        assert!(!has_lookalike(&ok, &name));
    }
}
