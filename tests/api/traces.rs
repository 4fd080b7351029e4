//! Traces, on the real binary: spans exported over OTLP to a collector the
//! test runs, continuing the caller's W3C trace, with the gRPC attributes
//! and a Redis child span; the trace id in the JSON logs; spans queued at
//! SIGTERM sent before the exit; and no export at all unless asked for.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use presence::proto::v1::{ListOnlineRequest, ReportUserRequest, WatchOnlineRequest};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::binary::{Binary, command};
use crate::helpers::{eventually, unique};
use crate::redis_server::RedisServer;

/// An OTLP/gRPC trace collector on a loopback port: it keeps every export.
struct Collector {
    address: SocketAddr,
    received: Received,
    task: JoinHandle<()>,
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().expect("not poisoned").push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let address = listener.local_addr().expect("bound");
        let received = Received::default();
        let service = TraceServiceServer::new(received.clone());
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        Self {
            address,
            received,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    fn exports(&self) -> usize {
        self.received.0.lock().expect("not poisoned").len()
    }

    /// Every span received so far, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let received = self.received.0.lock().expect("not poisoned");
        let mut spans = Vec::new();
        for export in received.iter() {
            for resource_spans in &export.resource_spans {
                let resource = resource_spans
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for scope_spans in &resource_spans.scope_spans {
                    spans.extend(scope_spans.spans.iter().map(|s| (resource.clone(), s.clone())));
                }
            }
        }
        spans
    }

    /// The spans of one trace.
    fn trace(&self, trace_id: &str) -> Vec<Span> {
        let id = hex(trace_id);
        self.spans()
            .into_iter()
            .map(|(_, span)| span)
            .filter(|span| span.trace_id == id)
            .collect()
    }

    /// Waits (at most 20 s) for a span named `name` in `trace_id`.
    async fn wait_for_span(&self, trace_id: &str, name: &str) -> Span {
        eventually(
            &format!("a span {name:?} in trace {trace_id}"),
            Duration::from_secs(20),
            || {
                let found = self.trace(trace_id).into_iter().find(|span| span.name == name);
                async move { found }
            },
        )
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A `traceparent` for a new trace: its trace id, the caller's span id, and
/// the header's value (sampled).
fn caller_trace() -> (String, String, String) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let trace_id = format!("{:016x}{:016x}", u64::from(std::process::id()), n);
    let span_id = format!("{:016x}", 0xc0ffee00_u64 + n);
    let header = format!("00-{trace_id}-{span_id}-01");
    (trace_id, span_id, header)
}

fn traced<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ASCII"));
    request
        .metadata_mut()
        .insert("tracestate", "caller=1".parse().expect("ASCII"));
    request
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match attribute(attributes, key)? {
        Value::IntValue(value) => Some(*value),
        _ => None,
    }
}

fn report(name: &str) -> ReportUserRequest {
    ReportUserRequest {
        username: name.to_owned(),
        room: String::new(),
    }
}

/// Presence with traces exported to `collector` every 50 ms.
async fn traced_presence(collector: &Collector, redis: Option<&RedisServer>, extra: &[(&str, &str)]) -> Binary {
    let endpoint = collector.endpoint();
    let url = redis.map(RedisServer::url);
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_SERVICE_NAME", "presence-under-test"),
        ("RUST_LOG", "info,presence::traces=debug"),
    ];
    if let Some(url) = &url {
        env.push(("PRESENCE_REDIS_URL", url.as_str()));
    }
    env.extend_from_slice(extra);
    Binary::start(&env).await
}

#[tokio::test]
async fn a_callers_trace_continues_through_presence_with_grpc_attributes_and_a_redis_child_span() {
    let redis = RedisServer::start();
    let collector = Collector::start().await;
    let mut presence = traced_presence(&collector, Some(&redis), &[]).await;
    let started = presence.wait_for_log("traces exported over OTLP").await;
    assert_eq!(started["endpoint"], collector.endpoint(), "{started}");
    presence
        .wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;

    // A report of a name never seen: it goes to Redis.
    let name = unique("traced-user");
    let (trace_id, caller_span, traceparent) = caller_trace();
    presence
        .client
        .clone()
        .report_user(traced(report(&name), &traceparent))
        .await
        .expect("accepted");

    let server = collector
        .wait_for_span(&trace_id, "presence.v1.Presence/ReportUser")
        .await;
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(
        server.parent_span_id,
        hex(&caller_span),
        "the caller's span is the parent"
    );
    let attributes = &server.attributes;
    assert_eq!(string(attributes, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        string(attributes, "rpc.service").as_deref(),
        Some("presence.v1.Presence")
    );
    assert_eq!(string(attributes, "rpc.method").as_deref(), Some("ReportUser"));
    assert_eq!(int(attributes, "rpc.grpc.status_code"), Some(0));
    assert_ne!(server.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));

    let redis_span = eventually("a Redis child span", Duration::from_secs(20), || {
        let found = collector
            .trace(&trace_id)
            .into_iter()
            .find(|span| span.parent_span_id == server.span_id && span.name == "redis");
        async move { found }
    })
    .await;
    assert_eq!(redis_span.kind, SpanKind::Client as i32);
    assert_eq!(string(&redis_span.attributes, "db.system").as_deref(), Some("redis"));
    assert_eq!(
        string(&redis_span.attributes, "db.operation").as_deref(),
        Some("report")
    );
    assert_eq!(int(&redis_span.attributes, "presence.batch.reports"), Some(1));

    // A list's round trip is named `page` (the README's list of operations).
    let (list_trace, _, traceparent) = caller_trace();
    let list = ListOnlineRequest {
        limit: 10,
        page_token: String::new(),
        room: String::new(),
    };
    presence
        .client
        .clone()
        .list_online(traced(list, &traceparent))
        .await
        .expect("listed");
    let list_server = collector
        .wait_for_span(&list_trace, "presence.v1.Presence/ListOnline")
        .await;
    let list_redis = eventually("a Redis child span of the list", Duration::from_secs(20), || {
        let found = collector
            .trace(&list_trace)
            .into_iter()
            .find(|span| span.parent_span_id == list_server.span_id && span.name == "redis");
        async move { found }
    })
    .await;
    assert_eq!(string(&list_redis.attributes, "db.operation").as_deref(), Some("page"));

    // The resource names the service as told.
    let (resource, _) = collector
        .spans()
        .into_iter()
        .find(|(_, span)| span.span_id == server.span_id)
        .expect("the server span");
    assert_eq!(
        string(&resource, "service.name").as_deref(),
        Some("presence-under-test")
    );

    // No span says who was reported.
    for span in collector.trace(&trace_id) {
        assert!(!format!("{span:?}").contains(&name), "{span:?}");
    }

    // A log line written within the call carries its trace id.
    let line = eventually("a log line with the trace id", Duration::from_secs(20), || {
        let found = presence
            .read_logs()
            .iter()
            .find(|line| line["trace_id"] == trace_id.as_str())
            .cloned();
        async move { found }
    })
    .await;
    assert_eq!(line["message"], "call answered", "{line}");
}

#[tokio::test]
async fn a_refused_call_and_a_cancelled_stream_are_traced_with_their_codes() {
    let collector = Collector::start().await;
    let presence = traced_presence(&collector, None, &[]).await;

    // Refused before any answer: the status is in the response headers.
    let (trace_id, _, traceparent) = caller_trace();
    let refused = presence
        .client
        .clone()
        .report_user(traced(report(""), &traceparent))
        .await
        .expect_err("an empty name is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let span = collector
        .wait_for_span(&trace_id, "presence.v1.Presence/ReportUser")
        .await;
    assert_eq!(int(&span.attributes, "rpc.grpc.status_code"), Some(3));
    assert_ne!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32),
        "INVALID_ARGUMENT is the client's error, not the server's"
    );

    // A stream the client drops: its span ends then, CANCELLED.
    let (trace_id, caller_span, traceparent) = caller_trace();
    let mut watch = presence
        .client
        .clone()
        .watch_online(traced(WatchOnlineRequest::default(), &traceparent))
        .await
        .expect("watching")
        .into_inner();
    watch.message().await.expect("a message").expect("a snapshot");
    drop(watch);
    let span = collector
        .wait_for_span(&trace_id, "presence.v1.Presence/WatchOnline")
        .await;
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.parent_span_id, hex(&caller_span));
    assert_eq!(string(&span.attributes, "rpc.method").as_deref(), Some("WatchOnline"));
    assert_eq!(int(&span.attributes, "rpc.grpc.status_code"), Some(1));

    // Health is traced too (a root span: the probe sent no trace).
    presence.health_of("").await.expect("health answers");
    eventually("a health span", Duration::from_secs(20), || {
        let found = collector
            .spans()
            .into_iter()
            .any(|(_, span)| span.name == "grpc.health.v1.Health/Check" && span.parent_span_id.is_empty());
        async move { found.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn spans_still_queued_at_sigterm_are_sent_before_the_process_exits() {
    let collector = Collector::start().await;
    // Ten minutes between exports: only the exit can send this span.
    let mut presence = traced_presence(&collector, None, &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]).await;
    let (trace_id, _, traceparent) = caller_trace();
    presence
        .client
        .clone()
        .report_user(traced(report("queued-at-exit"), &traceparent))
        .await
        .expect("accepted");
    assert_eq!(collector.exports(), 0, "nothing is sent before its time");

    presence.signal("TERM");
    let status = presence.wait_for_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let names: Vec<String> = collector.trace(&trace_id).into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"presence.v1.Presence/ReportUser".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn with_no_otel_variables_traces_are_off_and_the_log_says_so() {
    let mut presence = Binary::start(&[]).await;
    let off = presence.wait_for_log("traces off").await;
    assert_eq!(off["reason"], "no OTEL_EXPORTER_OTLP_ENDPOINT", "{off}");
    assert!(
        presence.read_logs().iter().all(|line| line.get("trace_id").is_none()),
        "{:?}",
        presence.seen
    );
}

#[tokio::test]
async fn otel_sdk_disabled_sends_nothing_to_a_listening_collector() {
    let collector = Collector::start().await;
    let mut presence = traced_presence(&collector, None, &[("OTEL_SDK_DISABLED", "true")]).await;
    let off = presence.wait_for_log("traces off").await;
    assert_eq!(off["reason"], "OTEL_SDK_DISABLED=true", "{off}");
    let (_, _, traceparent) = caller_trace();
    presence
        .client
        .clone()
        .report_user(traced(report("untraced"), &traceparent))
        .await
        .expect("accepted");

    // Had traces been on, the exit would have sent the queued spans (see
    // the test above): after it, the collector has its final answer.
    presence.signal("TERM");
    let status = presence.wait_for_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(collector.exports(), 0);
    assert!(
        presence.read_logs().iter().all(|line| line.get("trace_id").is_none()),
        "{:?}",
        presence.seen
    );
}

#[test]
fn an_otel_value_presence_cannot_honour_stops_it_with_a_clear_message() {
    let cases: [(&str, &str); 4] = [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
    ];
    for (variable, value) in cases {
        let output = command()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
            .env(variable, value)
            .output()
            .expect("presence runs");
        assert_eq!(output.status.code(), Some(2), "{variable}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
    }
}
