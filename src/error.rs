//! The one place where failures become gRPC statuses, and where a store
//! outage is logged.
//!
//! Clients see what they can act on: which field was wrong, that the
//! service is overloaded or the store unavailable and a retry may work, or
//! that their deadline passed. What went wrong inside (Redis's own error
//! text) goes to the log, never to the client; and the log gets one warning
//! when an outage starts and one line when it ends, not a line per call.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tonic::{Code, Status};

use crate::locks::lock;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request named something invalid; nothing was stored.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store could not answer in time.
    #[error(transparent)]
    Unavailable(StoreError),
    /// Refused at once: more work is waiting than the store can take.
    #[error("overloaded")]
    Overloaded,
    /// The caller's deadline passed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The server is shutting down (streams end with this).
    #[error("shutting down")]
    ShuttingDown,
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Overloaded | StoreError::Expired => ApiError::Overloaded,
            StoreError::Shared(shared) if !shared.is_backend_failure() => ApiError::Overloaded,
            other => ApiError::Unavailable(other),
        }
    }
}

impl ApiError {
    /// A field (`username`) or entry (`usernames[3]`) and what is wrong.
    pub fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {reason}"))
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::Unavailable(_) | ApiError::Overloaded | ApiError::ShuttingDown => Code::Unavailable,
            ApiError::DeadlineExceeded => Code::DeadlineExceeded,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(message) => Status::invalid_argument(message),
            ApiError::Unavailable(_) => Status::unavailable("presence store unavailable; retry later"),
            ApiError::Overloaded => Status::unavailable("overloaded; retry later"),
            ApiError::DeadlineExceeded => Status::deadline_exceeded("deadline exceeded"),
            ApiError::ShuttingDown => Status::unavailable("shutting down; reconnect"),
        }
    }
}

/// Turns a stream of store outcomes into two log lines per outage: a
/// warning when the store first fails, and a summary when it answers again.
#[derive(Clone, Default)]
pub struct OutageLog {
    state: Arc<Mutex<Option<Outage>>>,
}

struct Outage {
    since: Instant,
    failures: u64,
}

impl OutageLog {
    pub fn failed(&self, what: &str, error: &StoreError) {
        let mut state = lock(&self.state);
        match state.as_mut() {
            Some(outage) => outage.failures += 1,
            None => {
                tracing::warn!(%error, during = what, "presence store unavailable; calls fail with UNAVAILABLE until it is back");
                *state = Some(Outage {
                    since: Instant::now(),
                    failures: 1,
                });
            }
        }
    }

    pub fn answered(&self) {
        let mut state = lock(&self.state);
        if let Some(outage) = state.take() {
            tracing::info!(
                lasted = %humantime::format_duration(round_ms(outage.since.elapsed())),
                failed_calls = outage.failures,
                "presence store answers again"
            );
        }
    }
}

fn round_ms(duration: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_invalid_argument_names_the_field() {
        let status = Status::from(ApiError::invalid("username", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "username: must not be empty");
    }

    #[test]
    fn a_store_failure_is_unavailable_and_its_detail_stays_inside() {
        let status = Status::from(ApiError::from(StoreError::Pool("secret-host:6379 refused".into())));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("secret-host"));
        let status = Status::from(ApiError::from(StoreError::Timeout(Duration::from_millis(5))));
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[test]
    fn a_full_queue_says_overloaded() {
        let status = Status::from(ApiError::from(StoreError::Overloaded));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("overloaded"));
    }
}
