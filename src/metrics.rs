//! Prometheus metrics, served as text at `/metrics` on their own port.
//!
//! The gRPC series use the names and labels of go-grpc-prometheus, so the
//! dashboards and alerts people already have for gRPC servers work as-is:
//! `grpc_server_started_total`, `grpc_server_handled_total` (by `grpc_code`)
//! and the `grpc_server_handling_seconds` histogram. Presence's own series
//! start with `presence_`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tonic::Code;

use crate::keyspace::Kind;

/// Every series the service exports. Cheap to clone: all clones share them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling_seconds: Family<MethodLabels, Histogram>,
    redis_errors: Family<OperationLabels, Counter>,
    ticks: Family<KindLabels, Counter>,
    online: Family<KindLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Latency buckets from 100µs to 10s: presence calls are sub-millisecond
/// when healthy, and the tail up to the Redis timeout must still show.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling_seconds =
            Family::<MethodLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let redis_errors = Family::<OperationLabels, Counter>::default();
        let ticks = Family::<KindLabels, Counter>::default();
        let online = Family::<KindLabels, Gauge>::default();
        registry.register("grpc_server_started", "RPCs started on the server", started.clone());
        registry.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its response, in seconds",
            handling_seconds.clone(),
        );
        registry.register(
            "presence_redis_errors",
            "Redis calls that failed or timed out, by operation",
            redis_errors.clone(),
        );
        registry.register(
            "presence_ticks",
            "Rotations of current into old done by this replica, by kind",
            ticks.clone(),
        );
        registry.register(
            "presence_online",
            "People online at the last check, by kind",
            online.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                started,
                handled,
                handling_seconds,
                redis_errors,
                ticks,
                online,
            }),
        }
    }

    pub fn rpc_started(&self, service: &'static str, method: &'static str) {
        self.inner.started.get_or_create(&method_labels(service, method)).inc();
    }

    pub fn rpc_handled(&self, service: &'static str, method: &'static str, code: Code, elapsed: Duration) {
        let labels = HandledLabels {
            grpc_type: "unary",
            grpc_service: service,
            grpc_method: method,
            grpc_code: code_name(code),
        };
        self.inner.handled.get_or_create(&labels).inc();
        self.inner
            .handling_seconds
            .get_or_create(&method_labels(service, method))
            .observe(elapsed.as_secs_f64());
    }

    pub fn redis_error(&self, operation: &'static str) {
        self.inner
            .redis_errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    pub fn rotated(&self, kind: Kind) {
        self.inner
            .ticks
            .get_or_create(&KindLabels { kind: kind.as_str() })
            .inc();
    }

    pub fn set_online(&self, kind: Kind, count: u64) {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        self.inner
            .online
            .get_or_create(&KindLabels { kind: kind.as_str() })
            .set(count);
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.inner.registry);
        text
    }
}

fn method_labels(service: &'static str, method: &'static str) -> MethodLabels {
    MethodLabels {
        grpc_type: "unary",
        grpc_service: service,
        grpc_method: method,
    }
}

/// gRPC code names as every other gRPC implementation spells them.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Serves `/metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(scrape)).with_state(metrics);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn scrape(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

/// Where the metrics endpoint of a bound listener is, for logs.
pub fn url(address: SocketAddr) -> String {
    format!("http://{address}/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_calls_appear_under_the_standard_grpc_names() {
        let metrics = Metrics::new();
        metrics.rpc_started("presence.v1.Presence", "ReportUser");
        metrics.rpc_handled("presence.v1.Presence", "ReportUser", Code::Ok, Duration::from_millis(1));
        let text = metrics.render();
        assert!(text.contains(
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="presence.v1.Presence",grpc_method="ReportUser",grpc_code="OK"} 1"#
        ), "{text}");
        assert!(text.contains("grpc_server_handling_seconds_bucket{"), "{text}");
        assert!(
            text.contains(r#"grpc_server_started_total{grpc_type="unary""#),
            "{text}"
        );
    }

    #[test]
    fn presence_series_carry_their_kind() {
        let metrics = Metrics::new();
        metrics.rotated(Kind::Users);
        metrics.set_online(Kind::Guests, 7);
        metrics.redis_error("report");
        let text = metrics.render();
        assert!(text.contains(r#"presence_ticks_total{kind="users"} 1"#), "{text}");
        assert!(text.contains(r#"presence_online{kind="guests"} 7"#), "{text}");
        assert!(
            text.contains(r#"presence_redis_errors_total{operation="report"} 1"#),
            "{text}"
        );
    }
}
