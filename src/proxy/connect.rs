//! CONNECT: authenticate and decide at once, then either intercept TLS (a leaf for exactly the
//! CONNECT host, every request inside decided on its own) or tunnel blind to a passthrough host.
//!
//! SECURITY: the CONNECT authority is the destination. The TLS server name, when sent, must be
//! that host (else `host_mismatch`, no leaf issued); a failed client handshake closes the
//! connection and never falls back to a blind tunnel. A denied CONNECT has no side effect: no
//! DNS lookup, no upstream connection, no leaf certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::Notify;

use crate::decide::{self, normalize_host, ConnectDecision, Denial};
use crate::metrics::ConnKind;
use crate::policy::Scheme;
use crate::proxy::body::ProxyBody;
use crate::proxy::conn;
use crate::proxy::handle::{self, ConnCtx, ConnPlace, ConnSlot, TunnelCtx};
use crate::proxy::identify::{parse_authority, TunnelHost};
use crate::proxy::record::{self, RecordDraft};
use crate::proxy::respond::{self, DenyInfo, Failure};
use crate::proxy::upgrade;
use crate::reason::Reason;
use crate::state::{Generation, State};
use crate::upstream;

/// The longest a client's TLS handshake may take; a shorter `header_read_timeout` (the time
/// allowed for the first request head, which the handshake precedes) shortens it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(
    state: Arc<State>,
    ctx: &ConnCtx,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let client = ctx.client;
    let generation = state.current();
    let mut draft = RecordDraft::new(&state, client, generation.policy.version());
    draft.rec.method = "CONNECT".to_string();
    draft.rec.scheme = Scheme::Https.as_str();
    if !state.audit.accepting() {
        return respond::failure(
            Failure::Unavailable,
            draft.request_id(),
            draft.rec.task.as_deref(),
        );
    }
    let head_len = crate::proxy::identify::head_len(req.method(), req.uri(), req.headers());
    if head_len > state.settings.max_header_bytes {
        // A leak is named all the same (see `handle_request`).
        let carried = generation.credentials.carried_by(
            req.method(),
            req.uri(),
            req.headers(),
            &state.tasks,
            false,
        );
        let (denial, code) = if carried.is_empty() {
            draft.rec.outcome = Some(respond::HEAD_TOO_LARGE);
            (
                Denial::bare(Reason::AmbiguousRequest),
                Some(respond::HEAD_TOO_LARGE),
            )
        } else {
            draft.set_egress(&carried);
            (
                Denial::bare(Reason::SecretEgress),
                respond::egress_code(&carried),
            )
        };
        let mut resp = refuse(&state, &generation, &ctx.slot, draft, denial, code).await;
        respond::close_after(&mut resp);
        return resp;
    }
    let authority = req.uri().authority().map(|a| a.as_str()).unwrap_or("");
    // The record of a 407 still names the destination asked for (scrubbed like every field).
    if let Ok((host, port)) = parse_authority(authority, 443) {
        draft.set_host(&host, port);
    }
    let identified = state.tasks.authenticate(req.headers());
    if let Ok(task) = &identified {
        draft.set_task(task);
    }
    // SECURITY: a real credential in the agent's hands has leaked; not even a blind tunnel's
    // name (or its SNI/DNS lookup) may carry it out. Looked for first, so that a leak is named
    // even in a CONNECT refused for another reason too (no token, a wrong one, an ended task's).
    let carried = generation.credentials.carried_by(
        req.method(),
        req.uri(),
        req.headers(),
        &state.tasks,
        identified.is_ok(),
    );
    if !carried.is_empty() {
        draft.set_egress(&carried);
        let denial = Denial::bare(Reason::SecretEgress);
        let code = respond::egress_code(&carried);
        let mut resp = refuse(&state, &generation, &ctx.slot, draft, denial, code).await;
        // Refused before the task's validity and its hold on the connection were checked:
        // kept open, such a connection would escape `max_task_connections` (and outlive an
        // ended task).
        respond::close_after(&mut resp);
        return resp;
    }
    let task = match identified {
        Ok(t) => t,
        Err(reason) => {
            return refuse(
                &state,
                &generation,
                &ctx.slot,
                draft,
                Denial::bare(reason),
                None,
            )
            .await
        }
    };
    if let Err(d) = decide::check_validity(&task, SystemTime::now()) {
        return refuse(&state, &generation, &ctx.slot, draft, d, None).await;
    }
    if let Some((reason, code)) = ctx.slot.claim(&task, &state.settings) {
        let denial = Denial::bare(reason);
        let mut resp = refuse(&state, &generation, &ctx.slot, draft, denial, Some(code)).await;
        // The connection is not kept: it is another task's, or no task holds it.
        respond::close_after(&mut resp);
        return resp;
    }
    // SECURITY: CONNECT takes the authority form only (RFC 9110 §9.3.6); `CONNECT
    // http://host:port/` is a second spelling of the destination. A missing port is not guessed.
    let parsed = if req.uri().scheme().is_some() || req.uri().path_and_query().is_some() {
        Err(Some("not_authority_form"))
    } else if authority.ends_with(']') || !authority.contains(':') {
        Err(None)
    } else {
        parse_authority(authority, 443).map_err(|e| Some(e.code))
    };
    let (host, port) = match parsed {
        Ok(hp) => hp,
        Err(code) => {
            // The record names the host asked for when it reads as one (port 443 was only
            // assumed above), and never a guessed port.
            match (code, parse_authority(authority, 0)) {
                (None, Ok((host, _))) => draft.set_host(&host, 0),
                _ => draft.rec.host = String::new(),
            }
            let code = code.or(Some("missing_port"));
            return refuse(
                &state,
                &generation,
                &ctx.slot,
                draft,
                Denial::bare(Reason::AmbiguousRequest),
                code,
            )
            .await;
        }
    };
    draft.set_target("CONNECT", Scheme::Https, &host, port, "");
    if let Err(e) = crate::proxy::identify::connect_head(req.headers()) {
        let denial = Denial::bare(e.reason);
        let mut resp = refuse(&state, &generation, &ctx.slot, draft, denial, Some(e.code)).await;
        // (What follows such a head could be read as a body or as a tunnel's bytes.)
        respond::close_after(&mut resp);
        return resp;
    }
    let decision =
        decide::decide_connect(&generation.policy, &task, &host, port, SystemTime::now());
    let tunnel = TunnelHost { host, port };
    match decision {
        Err(d) => {
            draft.set_denial(&generation.policy, &d);
            let code = (d.reason == Reason::RouteNotInIntent).then_some(respond::AT_CONNECT);
            refuse(&state, &generation, &ctx.slot, draft, d, code).await
        }
        Ok(ConnectDecision::Intercept { service }) => {
            draft.set_match(&generation.policy, service, None, None);
            let on_upgrade = hyper::upgrade::on(req);
            tokio::spawn(intercept(
                state.clone(),
                client,
                ctx.slot.clone(),
                draft,
                task,
                tunnel,
                on_upgrade,
            ));
            Response::new(ProxyBody::empty())
        }
        Ok(ConnectDecision::Tunnel) => {
            passthrough(state, &generation, ctx, draft, task, tunnel, req).await
        }
    }
}

async fn refuse(
    state: &State,
    generation: &Generation,
    place: &ConnPlace,
    mut draft: RecordDraft,
    denial: Denial,
    code: Option<&'static str>,
) -> Response<ProxyBody> {
    let (hint, code) = respond::explain(&generation.policy, &denial, code, &draft.rec.host);
    draft.rec.detail = code;
    let task = draft.rec.task.clone();
    let mut resp = respond::deny(&DenyInfo {
        reason: denial.reason,
        request_id: draft.request_id(),
        task: task.as_deref(),
        hint,
        code,
    });
    respond::close_unless_authenticated(&mut resp, denial.reason, task.as_deref());
    // (The response's status: a head too large is 431, not the reason's 400.)
    let status = resp.status().as_u16();
    draft.write(state, denial.reason, status).await;
    // After the record, as in `handle::refuse`.
    if place.pace_denial(state).await {
        respond::close_after(&mut resp);
    }
    resp
}

/// Terminates the agent's TLS with a leaf for the CONNECT host and serves HTTP/1.1 or HTTP/2
/// inside, every request decided under the tunnel's task.
///
/// An async block, not an `async fn`: that would keep its arguments twice in the state every
/// tunnel holds for its whole life (~600 bytes).
#[allow(clippy::manual_async_fn)]
fn intercept(
    state: Arc<State>,
    client: SocketAddr,
    slot: ConnSlot,
    mut draft: RecordDraft,
    task: Arc<crate::tasks::Task>,
    tunnel: TunnelHost,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let Ok(upgraded) = on_upgrade.await else {
            draft.rec.outcome = Some("client_closed");
            return draft.write_detached(&state, Reason::Allowed, 200);
        };
        let _open = state.metrics.connection_opened(ConnKind::Intercepted);
        // Boxed, so its futures are freed once it is done: the tunnel's task keeps, for its
        // whole life, a slot as large as its largest state, and that should be the serving one.
        let (tls, h2) = match Box::pin(terminate_tls(&state, upgraded, &tunnel.host)).await {
            Ok(done) => done,
            Err(NotTerminated(outcome, reason)) => {
                draft.rec.outcome = Some(outcome);
                return draft.write_detached(&state, reason, 200);
            }
        };
        // The connection's place is given back only after the tunnel's record is written
        // (below): shutdown closes the audit log once every place is back.
        let _held = slot.clone();
        let close = Arc::new(Notify::new());
        let relay = Arc::new(tokio::sync::Semaphore::new(1));
        let (cut_tx, cut) = tokio::sync::watch::channel(false);
        let agent = Arc::new(crate::proxy::conn::AgentSide::default());
        let ctx = Arc::new(ConnCtx {
            client,
            agent: agent.clone(),
            slot: slot.clone(),
            tunnel: Some(TunnelCtx {
                task: task.clone(),
                host: tunnel,
                service: draft.rec.service.clone(),
                close: close.clone(),
                relay: relay.clone(),
                h2,
                cut,
            }),
        });
        let svc_state = state.clone();
        let svc =
            service_fn(move |req| handle::handle_in_tunnel(svc_state.clone(), ctx.clone(), req));
        let ends = conn::TunnelEnds {
            close,
            task: task.clone(),
            cut: cut_tx,
        };
        let served = conn::serve_intercepted(&state, tls, h2, svc, ends, slot, agent).await;
        if let Some(what) = served {
            let tunnel = record::InTunnel {
                task: &task,
                connect: &draft.rec,
            };
            record::unparsed(&state, client, what, Some(tunnel));
        }
        // A connection that became a WebSocket relay is still this tunnel: it ends with the
        // relay (which ends at the latest at shutdown or when the task ends).
        let _ = relay.acquire().await;
        let end = task.ended_at(SystemTime::now());
        draft.rec.outcome = Some(match end {
            Some(e) => e.as_str(),
            None if state.stopping() => "shutdown",
            None => "closed",
        });
        draft.write_detached(&state, Reason::Allowed, 200);
    }
}

/// The agent's side of an intercepted tunnel, once its TLS is terminated.
type AgentTls = tokio_rustls::server::TlsStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Why a tunnel ended before its TLS was terminated: its record's outcome and reason.
struct NotTerminated(&'static str, Reason);

/// Terminates the agent's TLS with a leaf for `host`; the stream (boxed: it outlives this
/// future in the tunnel's task), and whether ALPN chose HTTP/2.
async fn terminate_tls(
    state: &State,
    upgraded: hyper::upgrade::Upgraded,
    host: &str,
) -> Result<(Box<AgentTls>, bool), NotTerminated> {
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        TokioIo::new(upgraded),
    );
    // SECURITY (I7): a client that stalls its handshake (slowloris) holds a connection slot.
    let handshake_timeout = HANDSHAKE_TIMEOUT.min(state.settings.header_read_timeout);
    let hello = unless_stopping(state, tokio::time::timeout(handshake_timeout, acceptor));
    let start = match hello.await {
        None => return Err(NotTerminated("shutdown", Reason::Allowed)),
        Some(Ok(Ok(start))) => start,
        Some(_) => return Err(NotTerminated("tls_handshake_failed", Reason::Allowed)),
    };
    // SECURITY: domain fronting — the name the client asks TLS for must be the CONNECT host.
    if let Some(sni) = start.client_hello().server_name() {
        if normalize_host(sni).as_deref() != Some(host) {
            return Err(NotTerminated("tls_refused", Reason::HostMismatch));
        }
    }
    let config = state.leaves.server_config(host).await.map_err(|e| {
        tracing::error!(error = %e, "could not issue a leaf certificate");
        NotTerminated("leaf_failed", Reason::Allowed)
    })?;
    let handshake = tokio::time::timeout(handshake_timeout, start.into_stream(config));
    match unless_stopping(state, handshake).await {
        None => Err(NotTerminated("shutdown", Reason::Allowed)),
        Some(Ok(Ok(tls))) => {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok((Box::new(tls), h2))
        }
        Some(_) => Err(NotTerminated("tls_handshake_failed", Reason::Allowed)),
    }
}

/// `fut`, unless keyward begins to shut down first (`None`): a tunnel still in its TLS
/// handshake has nothing in flight, and waiting out the handshake's timeout could outlast a
/// short drain and lose the tunnel's record.
async fn unless_stopping<F: std::future::Future>(state: &State, fut: F) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        () = state.stopped() => None,
    }
}

/// One request taken from a task's budget, given back when dropped before `keep`.
struct Charge<'a>(Option<&'a crate::tasks::Task>);

impl Charge<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if let Some(task) = self.0 {
            task.refund();
        }
    }
}

/// A blind tunnel to a passthrough host: dial first (so a failure is a 502, not a dead tunnel),
/// then answer 200 and splice bytes both ways.
async fn passthrough(
    state: Arc<State>,
    generation: &Generation,
    ctx: &ConnCtx,
    mut draft: RecordDraft,
    task: Arc<crate::tasks::Task>,
    tunnel: TunnelHost,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let slot = ctx.slot.clone();
    // I7: a blind tunnel holds one of its task's places in flight for as long as it is open,
    // as a WebSocket relay does; else one task could hold every connection with idle tunnels.
    let Some(place) = task.enter(state.settings.max_task_in_flight) else {
        let denial = Denial::bare(Reason::BudgetExhausted);
        return refuse(
            &state,
            generation,
            &slot,
            draft,
            denial,
            Some(respond::IN_FLIGHT),
        )
        .await;
    };
    draft.in_flight = Some(place);
    // What a blind tunnel carries cannot be counted, so the tunnel is: one request of the
    // budget (else a task allowed one request could open tunnels without end).
    if !task.try_consume() {
        let denial = Denial::bare(Reason::BudgetExhausted);
        return refuse(&state, generation, &slot, draft, denial, None).await;
    }
    // Given back unless the tunnel opens: a dial that fails, or a CONNECT dropped while it
    // dials (the agent hung up or ended its side, shutdown).
    let charge = Charge(Some(&task));
    draft.arm(&state, Reason::Passthrough, None);
    let waiting = ctx.agent.awaiting_upstream().await;
    let dialled = async {
        let addrs = upstream::resolve(&tunnel.host, tunnel.port).await?;
        let named = generation.policy.passthrough_addresses();
        let addrs = upstream::check_addresses(addrs, Some(named), &state.listeners)?;
        tokio::time::timeout(state.settings.connect_timeout, upstream::dial(&addrs))
            .await
            .map_err(|_| upstream::ConnectError::Timeout)?
    }
    .await;
    drop(waiting);
    let tcp = match dialled {
        Ok(tcp) => tcp,
        Err(upstream::ConnectError::Blocked) => {
            drop(charge);
            return refuse(
                &state,
                generation,
                &slot,
                draft,
                Denial::bare(Reason::BlockedAddress),
                None,
            )
            .await;
        }
        Err(e) => {
            drop(charge);
            tracing::warn!(
                request_id = %draft.request_id(),
                host = %draft.rec.host,
                port = tunnel.port,
                kind = e.kind(),
                error = %e,
                "passthrough tunnel could not reach its upstream"
            );
            state.metrics.upstream_error("", e.kind());
            draft.rec.outcome = Some(e.kind());
            let resp = respond::failure(
                Failure::BadGateway,
                draft.request_id(),
                draft.rec.task.as_deref(),
            );
            draft
                .write(
                    &state,
                    Reason::Passthrough,
                    StatusCode::BAD_GATEWAY.as_u16(),
                )
                .await;
            return resp;
        }
    };
    charge.keep();
    let _ = tcp.set_nodelay(true);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let _slot = slot;
        let _open = state.metrics.connection_opened(ConnKind::Tunnel);
        match on_upgrade.await {
            Ok(upgraded) => {
                let agent = TokioIo::new(upgraded);
                let idle = Some(state.settings.idle_timeout);
                // Ends when a reload takes the host off `passthrough`, or gives it to a
                // service (whose traffic is intercepted): the operator cuts the channel.
                let (host, port) = (&tunnel.host, tunnel.port);
                let still_blind = |g: &crate::state::Generation| {
                    g.policy.is_passthrough(host)
                        && g.policy.host_table(Scheme::Https, host, port).is_none()
                };
                let ends = upgrade::Ends {
                    task: &task,
                    shutdown: state.shutdown_signal(),
                    disallowed: state.until_disallowed(still_blind),
                };
                let spliced = upgrade::splice(agent, tcp, ends, idle).await;
                draft.rec.bytes_up = spliced.from_a;
                draft.rec.bytes_down = spliced.from_b;
                draft.rec.outcome = Some(spliced.ended.as_str());
            }
            Err(_) => draft.rec.outcome = Some("client_closed"),
        }
        draft.write_detached(&state, Reason::Passthrough, 200);
    });
    Response::new(ProxyBody::empty())
}
