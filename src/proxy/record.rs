//! Audit records and decision metrics for the proxy, written exactly once per request or
//! CONNECT: a denial before it is sent, an allowed request when its response body ends, fails,
//! or the agent goes away (`Recorder`, finished by the response body or its drop).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::audit::AuditRecord;
use crate::decide::{Denial, Permit};
use crate::policy::{CompiledPolicy, Scheme};
use crate::reason::Reason;
use crate::state::State;
use crate::tasks::Task;

/// Builds the record of one request as the flow learns about it.
pub struct RecordDraft {
    pub rec: AuditRecord,
    started: Instant,
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
                client: client.to_string(),
                policy_version: policy_version.to_string(),
                outcome: None,
            },
            started: Instant::now(),
        }
    }

    pub fn request_id(&self) -> &str {
        &self.rec.request_id
    }

    pub fn set_task(&mut self, task: &Task) {
        self.rec.task = Some(task.id.clone());
        self.rec.agent = Some(task.agent.clone());
    }

    pub fn set_target(&mut self, method: &str, scheme: Scheme, host: &str, port: u16, path: &str) {
        self.rec.method = method.to_string();
        self.rec.scheme = scheme.as_str();
        self.rec.host = host.to_string();
        self.rec.port = Some(port);
        self.rec.path = path.to_string();
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

    /// Writes the record of a refusal (or of any request that ends here) before it is answered.
    pub async fn write(mut self, state: &State, reason: Reason, status: u16) {
        self.fill(reason, status);
        emit_metrics(state, &self.rec);
        state.audit.write(self.rec).await;
    }

    /// Writes without waiting (from drop paths and tunnel ends).
    pub fn write_detached(mut self, state: &State, reason: Reason, status: u16) {
        self.fill(reason, status);
        emit_metrics(state, &self.rec);
        state.audit.write_detached(self.rec);
    }

    fn fill(&mut self, reason: Reason, status: u16) {
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
        bytes_up: Arc<AtomicU64>,
    ) -> Recorder {
        self.fill(Reason::Allowed, status);
        self.rec.upstream_ms = Some(upstream_started.elapsed().as_secs_f64() * 1000.0);
        Recorder {
            state,
            draft: self,
            bytes_up,
        }
    }
}

/// Finishes an allowed request's record when its response ends.
pub struct Recorder {
    state: Arc<State>,
    draft: RecordDraft,
    bytes_up: Arc<AtomicU64>,
}

impl Recorder {
    /// `redacted`: reflected credentials replaced in this response (counted per service).
    pub fn complete(self, bytes_down: u64, outcome: &'static str, redacted: u64) {
        let Recorder {
            state,
            mut draft,
            bytes_up,
        } = self;
        draft.rec.bytes_up = bytes_up.load(Ordering::Relaxed);
        draft.rec.bytes_down = bytes_down;
        draft.rec.outcome = Some(outcome);
        draft.rec.ts = crate::audit::AuditRecord::now_ts();
        let service = draft.rec.service.as_deref().unwrap_or("");
        if redacted > 0 {
            state.metrics.secrets_redacted(service, redacted);
            tracing::warn!(request_id = %draft.rec.request_id, service, count = redacted, "upstream reflected the injected credential; redacted");
        }
        state
            .metrics
            .request_duration(service, draft.started.elapsed().as_secs_f64());
        emit_metrics(&state, &draft.rec);
        state.audit.write_detached(draft.rec);
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
