//! The one place where failures become gRPC statuses.
//!
//! Clients see what they can act on: which field was wrong, or that the
//! backend is unavailable and a retry may work. What went wrong inside
//! (Redis's own error text) goes to the log, never to the client.

use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request named something invalid; nothing was stored.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store could not answer in time.
    #[error(transparent)]
    Unavailable(#[from] StoreError),
}

impl ApiError {
    /// A field (`username`) or entry (`usernames[3]`) and what is wrong.
    pub fn invalid(field: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        Self::InvalidArgument(format!("{field}: {reason}"))
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::Unavailable(_) => Code::Unavailable,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::InvalidArgument(message) => Status::invalid_argument(message),
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "presence store unavailable");
                Status::unavailable("presence store unavailable; retry later")
            }
        }
    }
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
}
