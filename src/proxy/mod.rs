//! The proxy listener: accepts agent connections and hands each request to `handle`.
//!
//! Modules in the order a request meets them: `conn` (one connection) → `handle` (the flow) →
//! `identify` (target) → `connect` (CONNECT, tunnels, interception) → `forward` (upstream) →
//! `respond` (refusals and failures as responses) → `record` (audit + metrics) → `body`;
//! `upgrade` and `ws_redact` relay WebSocket upgrades.

pub mod body;
pub mod conn;
pub mod connect;
pub mod forward;
pub mod fragment;
pub mod handle;
pub mod identify;
pub mod record;
pub mod redact;
pub mod respond;
pub mod upgrade;
pub mod ws_redact;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::ConnKind;
use crate::places::{self, Strangers};
use crate::proxy::handle::ConnCtx;
use crate::state::State;

/// Accepts connections until shutdown, then waits (at most `proxy.shutdown_timeout`) for the open ones
/// to finish their requests. Each connection holds a permit of the connection limit.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    // Under a low open-files limit, only as many as fit (`keyward serve` warned at start).
    let places = crate::places::fitting_open_files(state.settings.max_connections);
    let limit = Arc::new(Semaphore::new(places));
    let strangers = Arc::new(Strangers::default());
    accept(listener, &state, &limit, &strangers).await;
    conn::drain(&state, &limit, places).await;
}

async fn accept(
    listener: TcpListener,
    state: &Arc<State>,
    limit: &Arc<Semaphore>,
    strangers: &Arc<Strangers>,
) {
    loop {
        // SECURITY (I7): while the audit queue is backed up (a stalled sink), take no new
        // connection: every request, even one the parser refuses before keyward sees it,
        // leaves a record, and those would wait in memory for as long as the stall lasts.
        // (A log that failed for good is not backed up: its requests get a 503.)
        while state.audit.backed_up() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = state.stopped() => return,
            }
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = state.stopped() => return,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Per-connection errors are the client's; running out of descriptors is ours:
                // back off instead of spinning.
                if is_resource_exhaustion(&e) {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        // SECURITY (I7): with every place taken, the oldest connection that has sent no
        // request yet makes room (`places`): a client without a token cannot hold them all.
        let permit = tokio::select! {
            p = places::place_for(limit, strangers) => match p { Some(p) => p, None => return },
            () = state.stopped() => return,
        };
        let stranger = strangers.arrive();
        let state = state.clone();
        tokio::spawn(async move {
            let _open = state.metrics.connection_opened(ConnKind::Http);
            let agent = Arc::new(conn::AgentSide::default());
            let ctx = Arc::new(ConnCtx {
                client,
                slot: Arc::new(handle::ConnPlace::new(permit)),
                tunnel: None,
                agent: agent.clone(),
            });
            let svc_state = state.clone();
            let svc = service_fn(move |req| handle::handle(svc_state.clone(), ctx.clone(), req));
            if let Some(what) = conn::serve_plain(&state, stream, svc, stranger, agent).await {
                record::unparsed(&state, client, what, None);
            }
        });
    }
}

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23) | Some(24)) // ENFILE, EMFILE
        || e.kind() == std::io::ErrorKind::OutOfMemory
}
