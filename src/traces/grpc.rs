//! One server span per gRPC call, as the OpenTelemetry conventions for gRPC
//! name it: `presence.v1.Presence/ReportUser`, kind server, with
//! `rpc.system=grpc`, `rpc.service`, `rpc.method` and
//! `rpc.grpc.status_code`. The caller's trace continues through it: its
//! parent comes from the W3C `traceparent` (and `tracestate`) metadata.
//!
//! The layer sits outermost on the tonic server, so it sees every call
//! (Presence, health, reflection; unary and streams) with the status the
//! client gets. That status is in the response headers for a call that
//! fails before answering (trailers-only), and in the trailers otherwise;
//! a call whose client went away before either is `CANCELLED`, as in the
//! metrics. A stream's span lasts as long as the stream.
//!
//! When traces are off the layer passes each call straight through.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::future::{BoxFuture, Either};
use http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use opentelemetry::{propagation::TextMapPropagator as _, trace::TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument as _, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::logs::{self, Call};
use super::{TARGET, is_on};

/// gRPC's CANCELLED, recorded for a call dropped before its status was
/// sent; UNKNOWN, for a response that ended without one.
const CANCELLED: i64 = 1;
const UNKNOWN: i64 = 2;

/// The layer for `Server::builder().layer(…)`: it traces when traces are on
/// (decided once, at startup).
#[derive(Debug, Clone, Copy)]
pub struct GrpcTraceLayer {
    on: bool,
}

impl GrpcTraceLayer {
    pub fn new() -> Self {
        Self { on: is_on() }
    }
}

impl Default for GrpcTraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner, on: self.on }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
    on: bool,
}

impl<S, ReqBody> Service<Request<ReqBody>> for GrpcTrace<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.on {
            return Either::Left(self.inner.call(request));
        }
        let outcome = Outcome::start(request.uri().path(), request.headers());
        let call = outcome.call.clone();
        let response = {
            let _entered = call.span.enter();
            self.inner.call(request)
        };
        let span = call.span.clone();
        let handled = async move {
            let response = response.await?;
            tracing::debug!(target: TARGET, "call answered");
            Ok(response)
        };
        Either::Right(Box::pin(async move {
            let mut outcome = outcome;
            let result = logs::within(call, handled.instrument(span)).await;
            match result {
                Ok(response) => {
                    if let Some(code) = grpc_status(response.headers()) {
                        outcome.finish(code);
                    }
                    Ok(response.map(|body| Body::new(TracedBody { body, outcome })))
                }
                Err(error) => {
                    outcome.finish(UNKNOWN);
                    Err(error)
                }
            }
        }))
    }
}

/// A call's span, until its status is recorded.
struct Outcome {
    call: Call,
    done: bool,
}

impl Outcome {
    fn start(path: &str, headers: &HeaderMap) -> Self {
        let (service, method) = rpc_of(path);
        let span = tracing::info_span!(
            target: TARGET,
            parent: None,
            "grpc server call",
            otel.name = format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
        );
        let parent = TraceContextPropagator::new().extract(&Metadata(headers));
        // Cannot fail here: the span is new and the layer is installed.
        let _ = span.set_parent(parent);
        // Starts the span, so its ids (the caller's trace, or a new one) are
        // known from now on.
        let trace_id = span.context().span().span_context().trace_id();
        Self {
            call: Call {
                trace_id,
                span,
                batch: None,
            },
            done: false,
        }
    }

    fn finish(&mut self, code: i64) {
        if self.done {
            return;
        }
        self.done = true;
        let span = &self.call.span;
        span.record("rpc.grpc.status_code", code);
        if is_server_error(code) {
            span.record("otel.status_code", "error");
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

/// The response body, watched for the trailers' status; the span ends when
/// it is dropped (after the trailers, or when the client goes away).
struct TracedBody {
    body: Body,
    outcome: Outcome,
}

impl http_body::Body for TracedBody {
    type Data = <Body as http_body::Body>::Data;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.outcome.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => self.outcome.finish(i64::from(i32::from(status.code()))),
            Poll::Ready(None) => self.outcome.finish(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The request metadata, as the propagator reads it.
struct Metadata<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// `grpc-status`, if present and a number.
fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The service and method of a gRPC path, `/package.Service/Method`. The
/// path is the client's to choose, so anything that is not two plain
/// identifiers is `_OTHER`, as the conventions say for an unknown method:
/// a span name never carries arbitrary client text.
fn rpc_of(path: &str) -> (&str, &str) {
    const LONGEST: usize = 128;
    let plain = |part: &str, dots: bool| {
        !part.is_empty()
            && part.len() <= LONGEST
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.'))
    };
    match path.strip_prefix('/').and_then(|rest| rest.split_once('/')) {
        Some((service, method)) if plain(service, true) && plain(method, false) => (service, method),
        _ => ("_OTHER", "_OTHER"),
    }
}

/// The codes the conventions count as the server's error on a server span.
fn is_server_error(code: i64) -> bool {
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
    // DATA_LOSS.
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_path_gives_its_service_and_method() {
        assert_eq!(
            rpc_of("/presence.v1.Presence/ReportUser"),
            ("presence.v1.Presence", "ReportUser")
        );
        assert_eq!(
            rpc_of("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
    }

    #[test]
    fn a_path_that_is_not_two_identifiers_is_other() {
        for path in [
            "/",
            "",
            "/presence.v1.Presence",
            "/presence.v1.Presence/",
            "/a/b/c",
            "/presence.v1.Presence/Report User",
            "/presence.v1.Presence/Report.User",
            "/presence.v1.Presence/%41",
            "/presence.v1.Presence/alice@example.com",
        ] {
            assert_eq!(rpc_of(path), ("_OTHER", "_OTHER"), "{path:?}");
        }
        let long = format!("/s/{}", "m".repeat(129));
        assert_eq!(rpc_of(&long), ("_OTHER", "_OTHER"));
    }

    #[test]
    fn the_status_is_read_from_headers_or_trailers_alike() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(grpc_status(&headers), Some(14));
        headers.insert("grpc-status", http::HeaderValue::from_static("fourteen"));
        assert_eq!(grpc_status(&headers), None);
    }

    #[test]
    fn server_errors_are_the_conventions_six() {
        let errors: Vec<i64> = (0..=16).filter(|code| is_server_error(*code)).collect();
        assert_eq!(errors, [2, 4, 12, 13, 14, 15]);
    }

    #[test]
    fn traceparent_and_tracestate_are_read_from_the_metadata() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert("tracestate", http::HeaderValue::from_static("vendor=value"));
        let parent = TraceContextPropagator::new().extract(&Metadata(&headers));
        let span = parent.span();
        let context = span.span_context();
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(context.trace_state().get("vendor"), Some("value"));
    }
}
