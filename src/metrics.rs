//! Prometheus metrics, served as text at `/metrics` on their own port.
//!
//! The gRPC series use the names and labels of go-grpc-prometheus, so the
//! dashboards and alerts people already have for gRPC servers work as-is:
//! `grpc_server_started_total`, `grpc_server_handled_total` (by `grpc_code`),
//! the `grpc_server_handling_seconds` histogram and, for streams,
//! `grpc_server_msg_sent_total`. Presence's own series start with
//! `presence_`. No label ever holds a name, an address or a token.

use std::{
    net::SocketAddr,
    sync::Arc,
    sync::atomic::{AtomicI64, AtomicU64},
    time::Duration,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tonic::Code;

use crate::domain::Kind;

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
    msg_sent: Family<MethodLabels, Counter>,
    redis_errors: Family<OperationLabels, Counter>,
    ticks: Family<KindLabels, Counter>,
    tick_interval: Gauge<f64, AtomicU64>,
    online: Family<KindLabels, Gauge>,
    rooms_online: Gauge,
    ready: Gauge,
    filter_checked: Counter,
    filter_skipped: Counter,
    queue_names: Gauge,
    shed: Family<GrpcMethodLabels, Counter>,
    watch_streams: Gauge<i64, AtomicI64>,
    watch_messages: Family<TypeLabels, Counter>,
    watch_resyncs: Counter,
    rooms_swept: Counter,
    last_seen_pruned: Counter,
    connections: Counter,
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
struct GrpcMethodLabels {
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
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

/// The kind of a gRPC method, as go-grpc-prometheus labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallType {
    Unary,
    ServerStream,
}

impl CallType {
    fn label(self) -> &'static str {
        match self {
            CallType::Unary => "unary",
            CallType::ServerStream => "server_stream",
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling_seconds =
            Family::<MethodLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let msg_sent = Family::<MethodLabels, Counter>::default();
        let redis_errors = Family::<OperationLabels, Counter>::default();
        let ticks = Family::<KindLabels, Counter>::default();
        let tick_interval = Gauge::<f64, AtomicU64>::default();
        let online = Family::<KindLabels, Gauge>::default();
        let rooms_online = Gauge::default();
        let ready = Gauge::default();
        let filter_checked = Counter::default();
        let filter_skipped = Counter::default();
        let queue_names = Gauge::default();
        let shed = Family::<GrpcMethodLabels, Counter>::default();
        let watch_streams = Gauge::<i64, AtomicI64>::default();
        let watch_messages = Family::<TypeLabels, Counter>::default();
        let watch_resyncs = Counter::default();
        let rooms_swept = Counter::default();
        let last_seen_pruned = Counter::default();
        let connections = Counter::default();
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
            "grpc_server_msg_sent",
            "Stream messages sent by the server",
            msg_sent.clone(),
        );
        registry.register(
            "presence_redis_errors",
            "Redis calls that failed or timed out, by operation",
            redis_errors.clone(),
        );
        registry.register(
            "presence_ticks",
            "Rotations of current into old done by this replica, site-wide, by kind",
            ticks.clone(),
        );
        registry.register(
            "presence_tick_interval_seconds",
            "The tick interval T: a name stays listed one to two intervals",
            tick_interval.clone(),
        );
        registry.register(
            "presence_online",
            "People online site-wide at the last check, by kind",
            online.clone(),
        );
        registry.register(
            "presence_rooms_online",
            "Rooms with someone online at the last check",
            rooms_online.clone(),
        );
        registry.register(
            "presence_ready",
            "1 while this replica reports SERVING for presence.v1.Presence (readiness)",
            ready.clone(),
        );
        registry.register(
            "presence_repeat_filter_checked",
            "Reported names the repeat filter looked at",
            filter_checked.clone(),
        );
        registry.register(
            "presence_repeat_filter_skipped",
            "Reported names the repeat filter skipped (no Redis work)",
            filter_skipped.clone(),
        );
        registry.register(
            "presence_report_queue_names",
            "Names waiting in the report queue",
            queue_names.clone(),
        );
        registry.register(
            "presence_shed",
            "Calls refused at once because the report queue was full, by method",
            shed.clone(),
        );
        registry.register(
            "presence_watch_streams",
            "WatchOnline streams open on this replica",
            watch_streams.clone(),
        );
        registry.register(
            "presence_watch_messages",
            "WatchOnline messages sent, by type (snapshot, changes, resync)",
            watch_messages.clone(),
        );
        registry.register(
            "presence_watch_resyncs",
            "Watchers that fell behind (or were behind a gap) and got a fresh snapshot",
            watch_resyncs.clone(),
        );
        registry.register(
            "presence_rooms_swept",
            "Rooms brought into a new interval (or removed) by this replica's sweep",
            rooms_swept.clone(),
        );
        registry.register(
            "presence_last_seen_pruned",
            "Last-seen entries removed after the retention",
            last_seen_pruned.clone(),
        );
        registry.register(
            "presence_grpc_connections",
            "Client connections accepted on the gRPC port",
            connections.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                started,
                handled,
                handling_seconds,
                msg_sent,
                redis_errors,
                ticks,
                tick_interval,
                online,
                rooms_online,
                ready,
                filter_checked,
                filter_skipped,
                queue_names,
                shed,
                watch_streams,
                watch_messages,
                watch_resyncs,
                rooms_swept,
                last_seen_pruned,
                connections,
            }),
        }
    }

    pub fn rpc_started(&self, call: CallType, service: &'static str, method: &'static str) {
        self.inner
            .started
            .get_or_create(&method_labels(call, service, method))
            .inc();
    }

    pub fn rpc_handled(
        &self,
        call: CallType,
        service: &'static str,
        method: &'static str,
        code: Code,
        elapsed: Duration,
    ) {
        let labels = HandledLabels {
            grpc_type: call.label(),
            grpc_service: service,
            grpc_method: method,
            grpc_code: code_name(code),
        };
        self.inner.handled.get_or_create(&labels).inc();
        self.inner
            .handling_seconds
            .get_or_create(&method_labels(call, service, method))
            .observe(elapsed.as_secs_f64());
    }

    pub fn msg_sent(&self, service: &'static str, method: &'static str, kind: &'static str) {
        self.inner
            .msg_sent
            .get_or_create(&method_labels(CallType::ServerStream, service, method))
            .inc();
        self.inner
            .watch_messages
            .get_or_create(&TypeLabels { r#type: kind })
            .inc();
        if kind == "resync" {
            self.inner.watch_resyncs.inc();
        }
    }

    pub fn redis_error(&self, operation: &'static str) {
        self.inner
            .redis_errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// The store's totals of site-wide rotations done by this replica.
    pub fn set_rotations(&self, totals: [u64; 2]) {
        for kind in Kind::ALL {
            let counter = self.inner.ticks.get_or_create(&KindLabels { kind: kind.as_str() });
            let total = totals[kind as usize];
            let now = counter.get();
            if total > now {
                counter.inc_by(total - now);
            }
        }
    }

    pub fn set_tick_interval(&self, interval: Duration) {
        self.inner.tick_interval.set(interval.as_secs_f64());
    }

    pub fn set_online(&self, kind: Kind, count: u64) {
        self.inner
            .online
            .get_or_create(&KindLabels { kind: kind.as_str() })
            .set(saturate(count));
    }

    pub fn set_rooms_online(&self, rooms: u64) {
        self.inner.rooms_online.set(saturate(rooms));
    }

    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.set(i64::from(ready));
    }

    /// The repeat filter's totals since the start (it keeps its own).
    pub fn set_filter_totals(&self, skipped: u64, checked: u64) {
        let counter = |c: &Counter, total: u64| {
            let now = c.get();
            if total > now {
                c.inc_by(total - now);
            }
        };
        counter(&self.inner.filter_skipped, skipped);
        counter(&self.inner.filter_checked, checked);
    }

    pub fn set_queue_names(&self, names: usize) {
        self.inner.queue_names.set(i64::try_from(names).unwrap_or(i64::MAX));
    }

    pub fn shed(&self, method: &'static str) {
        self.inner
            .shed
            .get_or_create(&GrpcMethodLabels { grpc_method: method })
            .inc();
    }

    pub fn watch_opened(&self) {
        self.inner.watch_streams.inc();
    }

    pub fn watch_closed(&self) {
        self.inner.watch_streams.dec();
    }

    pub fn maintained(&self, rooms_swept: u64, last_seen_pruned: u64) {
        self.inner.rooms_swept.inc_by(rooms_swept);
        self.inner.last_seen_pruned.inc_by(last_seen_pruned);
    }

    pub fn connection_accepted(&self) {
        self.inner.connections.inc();
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.inner.registry);
        text
    }
}

fn saturate(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn method_labels(call: CallType, service: &'static str, method: &'static str) -> MethodLabels {
    MethodLabels {
        grpc_type: call.label(),
        grpc_service: service,
        grpc_method: method,
    }
}

/// gRPC code names as go-grpc-prometheus spells them, but for `Cancelled`,
/// spelt as the gRPC specification does.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
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

/// How long the metrics server waits for a request's headers: a client
/// that stalls half-way must not hold a connection (or the shutdown) open.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` on `listener` until `shutdown` completes. Connections
/// still open then are dropped: a scrape is cheap to retry, and a stalled
/// client must never hold the process past its shutdown grace.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let app = Router::new().route("/metrics", get(scrape)).with_state(metrics);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false);
    let builder = builder.http1_only();
    let connections = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "metrics: accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        connections.spawn(async move {
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
    connections.close();
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
        metrics.rpc_started(CallType::Unary, "presence.v1.Presence", "ReportUser");
        metrics.rpc_handled(
            CallType::Unary,
            "presence.v1.Presence",
            "ReportUser",
            Code::Ok,
            Duration::from_millis(1),
        );
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
    fn cancelled_and_deadline_exceeded_calls_are_spelt_as_the_contract_says() {
        assert_eq!(code_name(Code::Cancelled), "Cancelled");
        assert_eq!(code_name(Code::DeadlineExceeded), "DeadlineExceeded");
    }

    #[test]
    fn presence_series_carry_their_kind() {
        let metrics = Metrics::new();
        metrics.set_rotations([1, 0]);
        metrics.set_online(Kind::Guests, 7);
        metrics.redis_error("report");
        metrics.set_tick_interval(Duration::from_secs(300));
        metrics.set_filter_totals(3, 10);
        metrics.set_filter_totals(2, 12);
        let text = metrics.render();
        assert!(text.contains(r#"presence_ticks_total{kind="users"} 1"#), "{text}");
        assert!(text.contains(r#"presence_online{kind="guests"} 7"#), "{text}");
        assert!(text.contains("presence_tick_interval_seconds 300"), "{text}");
        assert!(text.contains("presence_repeat_filter_skipped_total 3"), "{text}");
        assert!(text.contains("presence_repeat_filter_checked_total 12"), "{text}");
        assert!(
            text.contains(r#"presence_redis_errors_total{operation="report"} 1"#),
            "{text}"
        );
    }
}
