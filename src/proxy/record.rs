//! Audit records and decision metrics for the proxy, written exactly once per request or
//! CONNECT: a denial before it is sent, an allowed request when its response body ends, fails,
//! or the agent goes away (`Recorder`, finished by the response body or its drop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::audit::AuditRecord;
use crate::credentials::Carried;
use crate::decide::{Denial, Permit};
use crate::policy::{CompiledPolicy, Scheme};
use crate::proxy::body::Upload;
use crate::reason::Reason;
use crate::state::State;
use crate::tasks::Task;

/// What ended a connection before a request could be read from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unparsed {
    /// A head hyper could not parse, answered by hyper itself with this status (400, 431).
    Head(u16),
    /// The HTTP/2 preface where HTTP/1.1 was expected: closed unanswered.
    Http2Preface,
    /// Inside a tunnel, bytes of the other protocol than ALPN chose: closed unanswered.
    NotAlpnProtocol,
}

/// The tunnel an unparsed request came in: whose it was and where it led (its CONNECT's
/// record).
pub struct InTunnel<'a> {
    pub task: &'a Arc<Task>,
    pub connect: &'a AuditRecord,
}

/// SECURITY (I6): such a connection never reaches `handle`; it still leaves one record, so a
/// probe with malformed requests leaves a trace. Nothing of it is known but where it came
/// from, and in a tunnel whose it was and where it led.
pub fn unparsed(state: &State, client: SocketAddr, what: Unparsed, tunnel: Option<InTunnel>) {
    let generation = state.current();
    let mut draft = RecordDraft::new(state, client, generation.policy.version());
    if let Some(InTunnel { task, connect }) = tunnel {
        draft.set_task(task);
        draft.rec.scheme = Scheme::Https.as_str();
        draft.rec.host.clone_from(&connect.host);
        draft.rec.port = connect.port;
        draft.rec.service.clone_from(&connect.service);
    }
    let (status, outcome) = match what {
        Unparsed::Head(status) => (status, "unparsed"),
        Unparsed::Http2Preface => (CLOSED_UNANSWERED, "http2_preface"),
        Unparsed::NotAlpnProtocol => (CLOSED_UNANSWERED, "not_alpn_protocol"),
    };
    draft.rec.outcome = Some(outcome);
    draft.write_detached(state, Reason::AmbiguousRequest, status);
}

/// Builds the record of one request as the flow learns about it.
///
/// Once `arm`ed (the request was allowed and keyward waits on the upstream), a draft dropped
/// unwritten — hyper drops the request's future when the agent hangs up — still writes its
/// record, outcome `client_closed`, status 499 (nginx's "client closed request"); or, when
/// shutdown's drain ran out and keyward itself cut the connection, outcome `shutdown`, 503;
/// or, when the request's body had broken on the agent's side (an HTTP/2 stream reset for
/// it), outcome `agent_body_error`, 400.
pub struct RecordDraft {
    pub rec: AuditRecord,
    started: Instant,
    /// The task's place for this request in flight: held until the record is written, which
    /// for an allowed request is when its response (or WebSocket relay) ends.
    pub in_flight: Option<crate::tasks::InFlightSlot>,
    armed: Option<(Arc<State>, Reason)>,
    /// Armed once: the request was forwarded, and its duration is observed however it ends.
    forwarded: bool,
    /// The request body's count, for the record of a request dropped while it was sent.
    upload: Option<Arc<crate::proxy::body::Upload>>,
    /// The task the request was made under, whose denials it counts: the task itself, not
    /// whichever holds its id by then (a task minted again under an ended one's id).
    task: Option<Arc<Task>>,
}

/// Status recorded for a request whose agent went away before keyward answered it.
const CLIENT_CLOSED: u16 = 499;
/// Status recorded for a connection keyward closed without an answer (nginx's 444): an
/// HTTP/2 preface where HTTP/1.1 was expected (plain HTTP/2 is not offered on the listener),
/// or, in a tunnel, bytes of the other protocol than ALPN chose.
const CLOSED_UNANSWERED: u16 = 444;
/// Status recorded for a request still waiting on its upstream when shutdown's drain ran out
/// (the agent's connection is closed without an answer).
const CUT_BY_SHUTDOWN: u16 = 503;

impl Drop for RecordDraft {
    fn drop(&mut self) {
        if let Some((state, reason)) = self.armed.take() {
            // (Best effort: a body still in the request's own future, dialling, is dropped
            // first and says whether it had broken; one already handed to an upstream
            // connection's task is dropped after, and this reads as the agent leaving.)
            let (outcome, status) = cut_short(&state, self.upload.as_deref());
            self.rec.outcome = Some(outcome);
            self.rec.upstream_ms = Some(crate::audit::millis(self.started.elapsed()));
            if let Some(upload) = &self.upload {
                self.rec.bytes_up = upload.bytes();
            }
            self.finish(&state, reason, status);
            state.audit.write_detached(std::mem::take(&mut self.rec));
        }
    }
}

/// The outcome and status of an allowed request that ended before its answer: its body broke
/// on the agent's side (`agent_body_error`), keyward's shutdown cut it (`shutdown`), or the
/// agent went away (`client_closed`).
pub fn cut_short(state: &State, upload: Option<&Upload>) -> (&'static str, u16) {
    if upload.is_some_and(|u| u.agent_failed() && !u.agent_hung_up()) {
        let status = crate::proxy::respond::Failure::BadRequestBody.status();
        ("agent_body_error", status.as_u16())
    } else if state.drain_over() {
        ("shutdown", CUT_BY_SHUTDOWN)
    } else {
        ("client_closed", CLIENT_CLOSED)
    }
}

impl RecordDraft {
    pub fn new(state: &State, client: SocketAddr, policy_version: &str) -> RecordDraft {
        RecordDraft {
            rec: AuditRecord {
                ts: String::new(),
                request_id: state.next_request_id(),
                task: None,
                agent: None,
                decision: "deny",
                reason: "",
                method: String::new(),
                scheme: "http",
                host: String::new(),
                port: None,
                path: String::new(),
                service: None,
                capability: None,
                route: None,
                risk: None,
                credential: None,
                status: 0,
                upstream_ms: None,
                bytes_up: 0,
                bytes_down: 0,
                client: crate::audit::format_client(client),
                policy_version: policy_version.to_string(),
                outcome: None,
                detail: None,
            },
            started: Instant::now(),
            in_flight: None,
            armed: None,
            forwarded: false,
            upload: None,
            task: None,
        }
    }

    /// From here until the record is written, dropping the draft writes it (the agent hung
    /// up) as `reason` with outcome `client_closed`, counting the body bytes `upload` saw sent.
    pub fn arm(
        &mut self,
        state: &Arc<State>,
        reason: Reason,
        upload: Option<&Arc<crate::proxy::body::Upload>>,
    ) {
        self.armed = Some((state.clone(), reason));
        self.forwarded = true;
        self.upload = upload.cloned();
    }

    pub fn request_id(&self) -> &str {
        &self.rec.request_id
    }

    pub fn set_task(&mut self, task: &Arc<Task>) {
        self.rec.task = Some(task.id.clone());
        self.rec.agent = Some(task.agent.clone());
        self.task = Some(task.clone());
    }

    /// The request's task, when one was identified.
    pub fn task(&self) -> Option<&Arc<Task>> {
        self.task.as_ref()
    }

    pub fn set_target(&mut self, method: &str, scheme: Scheme, host: &str, port: u16, path: &str) {
        self.rec.method = method.to_string();
        self.rec.scheme = scheme.as_str();
        self.rec.host = host.to_string();
        self.rec.port = Some(port);
        self.rec.path = path.to_string();
    }

    /// The destination alone, before the target is known to be well-formed.
    pub fn set_host(&mut self, host: &str, port: u16) {
        self.rec.host = host.to_string();
        self.rec.port = (port != 0).then_some(port);
    }

    /// Fills service, capability, route and risk from the decision's indices.
    pub fn set_match(
        &mut self,
        policy: &CompiledPolicy,
        service: Option<usize>,
        capability: Option<usize>,
        route: Option<usize>,
    ) {
        if let Some(s) = service {
            self.rec.service = Some(policy.service_at(s).name.clone());
        }
        if let Some(c) = capability {
            let cap = policy.capability_at(c);
            self.rec.capability = Some(cap.name.clone());
            self.rec.risk = Some(cap.risk.as_str());
            if let Some(r) = route.and_then(|r| cap.route_text.get(r)) {
                self.rec.route = Some(r.clone());
            }
        }
    }

    /// A `secret_egress` refusal: the record names whose value the request carried, and so
    /// does a warning, since that secret has leaked to the agent and must be rotated.
    /// Every secret found is named (`a, (admin token)`): each has leaked.
    pub fn set_egress(&mut self, carried: &[Carried]) {
        let names: Vec<&str> = carried.iter().map(Carried::name).collect();
        let names = names.join(", ");
        let request_id = &self.rec.request_id;
        let task = self.rec.task.as_deref().unwrap_or("");
        let agent = self.rec.agent.as_deref().unwrap_or("");
        if carried.iter().all(|c| *c == Carried::TaskToken) {
            tracing::warn!(
                %request_id, task, agent, credential = %names,
                "a request carried a task token (secret_egress): refused; whoever it was meant for could use that task through keyward"
            );
        } else {
            tracing::warn!(
                %request_id, task, agent, credential = %names,
                "a request carried a secret's value (secret_egress): refused; it has leaked to the agent, rotate it"
            );
        }
        self.rec.credential = Some(names);
    }

    pub fn set_permit(&mut self, policy: &CompiledPolicy, permit: &Permit) {
        self.set_match(
            policy,
            Some(permit.service()),
            Some(permit.capability()),
            Some(permit.route()),
        );
    }

    pub fn set_denial(&mut self, policy: &CompiledPolicy, denial: &Denial) {
        self.set_match(policy, denial.service, denial.capability, denial.route);
    }

    /// Writes the record of a refusal (or of any request that ends here) and waits until it
    /// is written, so the record exists before the answer is sent (SPEC §7).
    pub async fn write(mut self, state: &State, reason: Reason, status: u16) {
        self.armed = None;
        self.finish(state, reason, status);
        state.audit.write(std::mem::take(&mut self.rec)).await;
    }

    /// Writes without waiting (from drop paths and tunnel ends).
    pub fn write_detached(mut self, state: &State, reason: Reason, status: u16) {
        self.armed = None;
        self.finish(state, reason, status);
        state.audit.write_detached(std::mem::take(&mut self.rec));
    }

    fn finish(&mut self, state: &State, reason: Reason, status: u16) {
        if self.forwarded {
            // A forwarded request that got no answer (the upstream failed or timed out, the
            // agent left) is observed too: the histogram would say nothing of a hung upstream.
            let service = self.rec.service.as_deref().unwrap_or("");
            state
                .metrics
                .request_duration(service, self.started.elapsed().as_secs_f64());
        }
        count_cut_by_stop(state, &self.rec);
        self.scrub(state);
        self.fill(reason, status);
        emit_metrics(state, &self.rec);
        if reason.decision() == crate::reason::Decision::Deny {
            if let Some(task) = &self.task {
                task.count_denied();
            }
        }
    }

    /// SECURITY (I4): the method, host and path of a refused request are the agent's bytes; one
    /// that carries a credential value (a `secret_egress` attempt, or a request refused for
    /// another reason first) must not be persisted. Allowed requests were scanned already.
    fn scrub(&mut self, state: &State) {
        let generation = state.current();
        let creds = &generation.credentials;
        // Methods and hosts are compared without case (a host is case-folded on the way).
        for field in [&mut self.rec.method, &mut self.rec.host] {
            if !field.is_empty() && creds.carried_in_any_case(&[field.as_bytes()]) {
                *field = "[redacted]".to_string();
            }
        }
        let path = &mut self.rec.path;
        if !path.is_empty() && creds.carried_in(&[path.as_bytes()]) {
            *path = "[redacted]".to_string();
        }
    }

    fn fill(&mut self, reason: Reason, status: u16) {
        // SECURITY (I4): never a task token in a record, even the agent's own in its path (or
        // sent as the method: any token is a method to the parser).
        for field in [&mut self.rec.method, &mut self.rec.host, &mut self.rec.path] {
            if let Some(clean) = crate::tasks::redact_tokens(field) {
                *field = clean;
            }
        }
        self.rec.ts = crate::audit::AuditRecord::now_ts();
        self.rec.reason = reason.as_str();
        self.rec.decision = reason.decision().as_str();
        self.rec.status = status;
    }

    /// Turns the draft of an allowed request into the recorder its response body finishes.
    pub fn into_recorder(
        mut self,
        state: Arc<State>,
        status: u16,
        upstream_started: Instant,
        upload: Arc<Upload>,
    ) -> Recorder {
        self.armed = None;
        self.fill(Reason::Allowed, status);
        self.rec.upstream_ms = Some(crate::audit::millis(upstream_started.elapsed()));
        Recorder {
            state,
            draft: self,
            upload,
        }
    }
}

/// Finishes an allowed request's record when its response ends.
pub struct Recorder {
    state: Arc<State>,
    draft: RecordDraft,
    upload: Arc<Upload>,
}

impl Recorder {
    /// The task the request was made for (its place in flight is held until `complete`).
    pub fn task(&self) -> Option<&crate::tasks::Task> {
        self.draft.in_flight.as_ref().map(|slot| slot.task())
    }

    /// The same, shared (for a future that outlives a borrow).
    pub fn shared_task(&self) -> Option<Arc<crate::tasks::Task>> {
        self.draft.in_flight.as_ref().map(|slot| slot.shared_task())
    }

    /// How a response that stopped before its end ended: keyward cut it at shutdown or because
    /// its task was revoked or expired, or the agent went away.
    pub fn cut_outcome(&self) -> &'static str {
        if self.state.drain_over() {
            return "shutdown";
        }
        // Dropped because its task was revoked or expired (`conn::serve_intercepted`).
        match self
            .task()
            .and_then(|t| t.cut_at(std::time::SystemTime::now()))
        {
            Some(end) => end.as_str(),
            None => "client_closed",
        }
    }

    /// `redacted`: reflected credentials replaced in this response (counted per service).
    pub fn complete(self, bytes_down: u64, outcome: &'static str, redacted: u64) {
        self.complete_relay(0, bytes_down, outcome, redacted);
    }

    /// `complete` for a request that became a relay (WebSocket): `relayed_up` bytes went from
    /// the agent to the upstream after the upgrade, besides the request's own body.
    pub fn complete_relay(
        self,
        relayed_up: u64,
        bytes_down: u64,
        outcome: &'static str,
        redacted: u64,
    ) {
        let Recorder {
            state,
            mut draft,
            upload,
        } = self;
        draft.armed = None;
        draft.rec.bytes_up = upload.bytes().saturating_add(relayed_up);
        draft.rec.bytes_down = bytes_down;
        draft.rec.outcome = Some(outcome);
        draft.rec.ts = crate::audit::AuditRecord::now_ts();
        let service = draft.rec.service.as_deref().unwrap_or("");
        if outcome == "websocket_protocol_error" {
            // The upstream's frames broke the protocol: an upstream failure, as a malformed
            // response is.
            state.metrics.upstream_error(service, "protocol");
        }
        if redacted > 0 {
            state.metrics.secrets_redacted(service, redacted);
            tracing::warn!(request_id = %draft.rec.request_id, service, count = redacted, "upstream reflected the injected credential; redacted");
        }
        state
            .metrics
            .request_duration(service, draft.started.elapsed().as_secs_f64());
        count_cut_by_stop(&state, &draft.rec);
        emit_metrics(&state, &draft.rec);
        state.audit.write_detached(std::mem::take(&mut draft.rec));
    }
}

/// A tunnel closed at the stop is its normal end; a request or relay cut is not.
fn count_cut_by_stop(state: &State, rec: &AuditRecord) {
    if rec.outcome == Some("shutdown") && rec.method != "CONNECT" {
        state.count_cut_by_stop();
    }
}

fn emit_metrics(state: &State, rec: &AuditRecord) {
    state.metrics.decision(
        rec.decision,
        rec.reason,
        rec.service.as_deref().unwrap_or(""),
        rec.capability.as_deref().unwrap_or(""),
        // SECURITY: only a policy agent name is a label; unauthenticated requests have none.
        rec.agent.as_deref().unwrap_or(""),
    );
}
