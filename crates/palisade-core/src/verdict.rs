use std::fmt;

/// Whether a control acts on what it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Rejections are answered.
    #[default]
    Enforce,
    /// Rejections are only counted (`would_block`); the request goes through.
    /// For tuning on live traffic before enforcing.
    Shadow,
}

impl Mode {
    /// The name used in config, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Shadow => "shadow",
        }
    }
}

/// Why a request was (or, in shadow mode, would have been) rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Over the per-client rate limit: 429.
    RateLimited,
    /// Reputation score below the block threshold: 403.
    Reputation,
    /// Source matches the deny list: 403.
    Denylisted,
    /// Every upstream's circuit breaker is open: 503, no upstream call.
    BreakerOpen,
    /// This client's adaptive breaker is open: 503.
    ClientBreakerOpen,
}

impl RejectReason {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Reputation => "reputation_blocked",
            Self::Denylisted => "denylisted",
            Self::BreakerOpen => "breaker_open",
            Self::ClientBreakerOpen => "client_breaker_open",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
