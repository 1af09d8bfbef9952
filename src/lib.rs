//! keyward: a forward HTTP(S) proxy that holds API credentials for AI agents and puts them into
//! a request only when the route, the method and the task's declared intent allow it.
//!
//! ```text
//!  agent ──HTTP_PROXY / CONNECT──▶ proxy::conn ──▶ proxy::handle
//!                                                   │ identify   tasks (token → Task)
//!                                                   │ target     proxy::identify + matcher::canon
//!                                                   │ decide     decide (pure: policy × task × facts)
//!                                                   │ inject     credentials (needs a Permit)
//!                                                   │ forward    proxy::forward → upstream (pooled, per service)
//!                                                   ▼ record     proxy::record → audit + metrics
//!  operator ──▶ admin (tasks, reload, /metrics, /healthz, /readyz)
//! ```
//!
//! Modules, in the order a request meets them (imports only go down the list):
#![forbid(unsafe_code)]

/// The admin API and its CLI client.
pub mod admin;
/// Wiring: load, bind, serve, shut down.
pub mod app;
/// Audit records of SPEC §7 and their writer.
pub mod audit;
/// The command line.
pub mod cli;
/// Credential sources and injection.
pub mod credentials;
/// The decision: `decide(policy, task, facts, now) -> Permit | Denial`.
pub mod decide;
/// Reading the files an operator names: regular files only, without blocking, bounded.
pub mod files;
/// Path canonicalization and route matching (pure).
pub mod matcher;
/// Prometheus metrics of SPEC §8, in one place.
pub mod metrics;
/// A listener's connection places, and the strangers that give theirs up when it is full.
pub mod places;
/// The policy file: load, check, compile.
pub mod policy;
/// The proxy listener and the request flow.
pub mod proxy;
/// The closed set of decision reasons and their statuses.
pub mod reason;
/// `Secret`: redacted, zeroized, constant-time compared.
pub mod secret;
/// Shared state: the current policy generation, tasks, leaves, audit, metrics.
pub mod state;
/// Tasks: mint, verify tokens, expiry, revocation, budgets.
pub mod tasks;
/// TLS: the CA, leaf certificates, upstream client configs.
pub mod tls;
/// Upstream clients, one pool per service; address checks; dialling.
pub mod upstream;
