//! The request size limit, with the status gRPC clients expect for it.
//!
//! tonic refuses a message above `max_decoding_message_size` with
//! `OUT_OF_RANGE`; gRPC's own implementations answer `RESOURCE_EXHAUSTED`,
//! and that is what clients retry or report on. This layer turns the one
//! into the other, on the way out, and changes nothing else.

use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};

/// What tonic says when a request is too large.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

#[derive(Debug, Clone, Copy)]
pub struct RequestSizeLayer {
    limit: usize,
}

impl RequestSizeLayer {
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSize {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestSize<S> {
    inner: S,
    limit: usize,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestSize<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let limit = self.limit;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let headers = response.headers_mut();
            let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
                && headers
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .is_some_and(|m| percent_decoded(m).starts_with(TONIC_TOO_LARGE));
            if too_large {
                headers.insert("grpc-status", HeaderValue::from_static("8"));
                let message = format!("request larger than {} bytes", limit);
                if let Ok(value) = HeaderValue::from_str(&message) {
                    headers.insert("grpc-message", value);
                }
            }
            Ok(response)
        })
    }
}

/// `grpc-message` is percent-encoded; spaces and commas are what matter
/// here.
fn percent_decoded(message: &str) -> String {
    message.replace("%20", " ").replace("%2C", ",").replace("%3A", ":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_message_is_recognised_encoded_or_not() {
        assert!(
            percent_decoded("Error,%20decoded%20message%20length%20too%20large:%20found").starts_with(TONIC_TOO_LARGE)
        );
        assert!(percent_decoded("Error, decoded message length too large: found 5 bytes").starts_with(TONIC_TOO_LARGE));
    }
}
