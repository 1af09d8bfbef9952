//! `Reason`: the closed set of decision reasons of SPEC §4.3 and the status each one answers with.
//!
//! These words are the interface (audit records, metric labels, deny bodies); adding a variant
//! forces `respond.rs` and every exhaustive match to say what it means.

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    Passthrough,
    MissingCredentials,
    InvalidToken,
    TaskExpired,
    TaskRevoked,
    UnknownHost,
    RouteNotInIntent,
    MethodNotAllowed,
    ConstraintMismatch,
    AmbiguousRequest,
    HostMismatch,
    BlockedAddress,
    BudgetExhausted,
    ApprovalRequired,
    SecretEgress,
    CredentialUnavailable,
}

/// The three outcomes of SPEC §2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    Tunnel,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Tunnel => "tunnel",
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Passthrough => "passthrough",
            Reason::MissingCredentials => "missing_credentials",
            Reason::InvalidToken => "invalid_token",
            Reason::TaskExpired => "task_expired",
            Reason::TaskRevoked => "task_revoked",
            Reason::UnknownHost => "unknown_host",
            Reason::RouteNotInIntent => "route_not_in_intent",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::ConstraintMismatch => "constraint_mismatch",
            Reason::AmbiguousRequest => "ambiguous_request",
            Reason::HostMismatch => "host_mismatch",
            Reason::BlockedAddress => "blocked_address",
            Reason::BudgetExhausted => "budget_exhausted",
            Reason::ApprovalRequired => "approval_required",
            Reason::SecretEgress => "secret_egress",
            Reason::CredentialUnavailable => "credential_unavailable",
        }
    }

    pub fn decision(self) -> Decision {
        match self {
            Reason::Allowed => Decision::Allow,
            Reason::Passthrough => Decision::Tunnel,
            _ => Decision::Deny,
        }
    }

    /// The status the agent receives for a denial with this reason (SPEC §4.3).
    pub fn status(self) -> StatusCode {
        match self {
            Reason::Allowed | Reason::Passthrough => StatusCode::OK,
            Reason::MissingCredentials
            | Reason::InvalidToken
            | Reason::TaskExpired
            | Reason::TaskRevoked => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Reason::UnknownHost
            | Reason::RouteNotInIntent
            | Reason::MethodNotAllowed
            | Reason::ConstraintMismatch
            | Reason::HostMismatch
            | Reason::BlockedAddress
            | Reason::ApprovalRequired
            | Reason::SecretEgress => StatusCode::FORBIDDEN,
            Reason::AmbiguousRequest => StatusCode::BAD_REQUEST,
            Reason::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            Reason::CredentialUnavailable => StatusCode::BAD_GATEWAY,
        }
    }

    /// A short human title for the problem document.
    pub fn title(self) -> &'static str {
        match self {
            Reason::Allowed => "Allowed",
            Reason::Passthrough => "Tunnelled without inspection",
            Reason::MissingCredentials => "Proxy credentials missing",
            Reason::InvalidToken => "Proxy credentials invalid",
            Reason::TaskExpired => "Task expired",
            Reason::TaskRevoked => "Task revoked",
            Reason::UnknownHost => "Host not configured",
            Reason::RouteNotInIntent => "Route not in the task's intent",
            Reason::MethodNotAllowed => "Method not allowed for this route",
            Reason::ConstraintMismatch => "Path parameter outside the task's constraints",
            Reason::AmbiguousRequest => "Ambiguous request refused",
            Reason::HostMismatch => "Host does not match the tunnel",
            Reason::BlockedAddress => "Upstream address blocked",
            Reason::BudgetExhausted => "Task request budget exhausted",
            Reason::ApprovalRequired => "Approval required",
            Reason::SecretEgress => "Request carries a real credential",
            Reason::CredentialUnavailable => "Credential unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_spec_table() {
        assert_eq!(Reason::MissingCredentials.status().as_u16(), 407);
        assert_eq!(Reason::TaskRevoked.status().as_u16(), 407);
        assert_eq!(Reason::UnknownHost.status().as_u16(), 403);
        assert_eq!(Reason::AmbiguousRequest.status().as_u16(), 400);
        assert_eq!(Reason::BudgetExhausted.status().as_u16(), 429);
        assert_eq!(Reason::CredentialUnavailable.status().as_u16(), 502);
        assert_eq!(Reason::Passthrough.decision(), Decision::Tunnel);
        assert_eq!(Reason::SecretEgress.decision(), Decision::Deny);
    }
}
