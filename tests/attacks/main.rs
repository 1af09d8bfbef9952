//! Attack suite (issue 3): one module per family, each case named after what it attacks. Every
//! case drives the real server over loopback and asserts on what the upstream received, what the
//! agent received, the audit record, and a leak scan of everything keyward wrote.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod admin_self;
mod authentication;
mod authority;
mod destinations;
mod exhaustion;
mod fail_closed;
mod framing;
mod headers;
mod leaks;
mod paths_methods;
mod tls;
mod upgrades;
