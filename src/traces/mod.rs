//! Traces: OpenTelemetry spans exported over OTLP/gRPC, off by default.
//!
//! - `config`: whether to export, from the standard `OTEL_*` variables.
//! - `export`: the SDK's batch processor and the OTLP exporter.
//! - `grpc`: the tower layer that gives each gRPC call its server span,
//!   continuing the caller's W3C trace.
//! - `logs`: the trace id of the call in hand, and the log format that
//!   adds it to each line.
//! - here: the Redis spans, and how a coalesced report batch is traced.
//!
//! What is traced: every gRPC call (a server span); within it, every Redis
//! round trip (a client span, `db.system=redis`, `db.operation` naming the
//! store operation, never a key or a name). Reports wait in a shared queue
//! and go to Redis in batches run by a background task: a batch's Redis
//! span is the child of the first traced caller in it, with a span link to
//! each other traced caller and `presence.batch.reports` saying how many
//! reports it carried. A report the repeat filter answers from memory has
//! no Redis span. Background work (the health probe, upkeep, the watch fan-out, the
//! pub/sub bus) is not traced: it belongs to no call.
//!
//! Off (the default), nothing here runs: no exporter, no thread, no span;
//! the gRPC layer passes calls straight through, and each store round trip
//! checks one flag.

mod config;
mod export;
mod grpc;
mod logs;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::future::Either;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::trace::SdkTracer;
use tokio::task::futures::TaskLocalFuture;
use tracing::{Instrument as _, Subscriber, field::Empty, instrument::Instrumented, level_filters::LevelFilter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{Layer, filter, registry::LookupSpan};

pub use self::config::{ConfigError, Otlp, TracesConfig};
pub(crate) use self::export::Pipeline;
pub use self::grpc::GrpcTraceLayer;
pub(crate) use self::logs::WithTraceId;
use self::logs::{Batch, Call};

/// The `tracing` target of Presence's spans: the OpenTelemetry layer takes
/// these and nothing else; the log layer never shows them.
const TARGET: &str = "presence::traces";

static ON: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: set once, at startup, before the server
/// starts.
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

pub(crate) fn turn_on() {
    ON.store(true, Ordering::Relaxed);
}

/// The `tracing` layer that turns Presence's spans into OpenTelemetry spans.
pub(crate) fn layer<S>(tracer: SdkTracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Parents come from the spans themselves; no OpenTelemetry context
        // is attached on every poll.
        .with_context_activation(false)
        // No busy/idle timings, thread, source location, level or target
        // attributes: they cost on every span and say nothing about a call.
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_level(false)
        .with_target(false)
        .with_filter(filter::Targets::new().with_target(TARGET, LevelFilter::INFO))
}

/// For the log layer: everything but Presence's spans (events pass).
pub(crate) fn not_our_spans<S>() -> impl tracing_subscriber::layer::Filter<S> {
    filter::filter_fn(|metadata| !(metadata.is_span() && metadata.target() == TARGET))
        .with_max_level_hint(LevelFilter::TRACE)
}

/// Runs one Redis round trip, as a child span of the traced call it serves
/// (if any). `operation` is the store operation's name; see
/// [`operation_of`].
pub(crate) fn redis_round_trip<F: Future>(
    operation: impl FnOnce() -> &'static str,
    future: F,
) -> Either<F, Instrumented<F>> {
    let Some(call) = is_on().then(logs::current).flatten() else {
        return Either::Left(future);
    };
    let span = tracing::info_span!(
        target: TARGET,
        parent: &call.span,
        "redis",
        otel.kind = "client",
        db.system = "redis",
        db.operation = operation(),
        presence.batch.reports = Empty,
    );
    if let Some(batch) = &call.batch {
        span.record(
            "presence.batch.reports",
            i64::try_from(batch.reports).unwrap_or(i64::MAX),
        );
        for other in &batch.others {
            span.add_link(other.clone());
        }
    }
    Either::Right(future.instrument(span))
}

/// The store operation a closure belongs to, from its type's name: the
/// function it is written in (`page`, `leave`; `report` for the report
/// queue's batches, which `send`). This keeps the names out of every call
/// site in the store; a name the compiler spells otherwise gives `redis`.
pub(crate) fn operation_of(type_name: &'static str) -> &'static str {
    let mut name = type_name;
    while let Some(outer) = name.strip_suffix("::{{closure}}") {
        name = without_generics(outer);
    }
    match name.rsplit("::").next().unwrap_or(name) {
        "send" => "report",
        last if !last.is_empty() && last.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => last,
        _ => "redis",
    }
}

/// `f<'_, T<U>>` is `f`: a path's last generic arguments, taken off.
fn without_generics(path: &str) -> &str {
    if !path.ends_with('>') {
        return path;
    }
    let mut depth = 0usize;
    for (at, byte) in path.bytes().enumerate().rev() {
        match byte {
            b'>' => depth += 1,
            b'<' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return &path[..at];
                }
            }
            _ => {}
        }
    }
    path
}

/// A report's caller, as the report queue keeps it: its traced call, if
/// traces are on and it is one.
pub(crate) struct Caller(Option<Call>);

impl Caller {
    pub fn current() -> Self {
        Self(is_on().then(logs::current).flatten())
    }
}

/// The callers of one coalesced batch, as the report queue collects them.
/// With traces off it only counts: no allocation.
#[derive(Default)]
pub(crate) struct Callers {
    reports: usize,
    traced: Vec<Call>,
}

impl Callers {
    pub fn push(&mut self, caller: Caller) {
        self.reports += 1;
        self.traced.extend(caller.0);
    }
}

/// Runs a coalesced batch for these callers. Its Redis round trips are
/// children of the first traced caller's span, with a link to each other
/// traced caller's (so each caller's trace has a Redis span only if its
/// report led the batch; the others find it by the link).
pub(crate) fn report_batch<F: Future>(callers: Callers, future: F) -> Either<F, TaskLocalFuture<Call, F>> {
    let mut traced = callers.traced.into_iter();
    let Some(first) = traced.next() else {
        return Either::Left(future);
    };
    let others = traced
        .map(|other| other.span.context().span().span_context().clone())
        .collect();
    let call = Call {
        batch: Some(Arc::new(Batch {
            reports: callers.reports,
            others,
        })),
        ..first
    };
    Either::Right(logs::within(call, future))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of<F>(_: &F) -> &'static str {
        operation_of(std::any::type_name::<F>())
    }

    struct Store;

    impl Store {
        fn leave(&self) -> &'static str {
            let closure = |x: u8| async move { x };
            name_of(&closure)
        }

        async fn page(&self) -> &'static str {
            let closure = |x: u8| async move { x };
            name_of(&closure)
        }
    }

    #[tokio::test]
    async fn an_operation_is_named_after_the_function_its_closure_is_in() {
        assert_eq!(Store.leave(), "leave");
        assert_eq!(Store.page().await, "page");
    }

    #[test]
    fn an_odd_type_name_gives_redis() {
        assert_eq!(operation_of(""), "redis");
        assert_eq!(operation_of("a::<b as c>::{{closure}}"), "redis");
        assert_eq!(operation_of("presence::store::redis::Redis::bounded<T>"), "redis");
        assert_eq!(operation_of("a::b<c::D<'_>>::page<T>::{{closure}}"), "page");
    }

    #[tokio::test]
    async fn with_traces_off_nothing_is_wrapped() {
        assert!(!is_on());
        assert!(Caller::current().0.is_none());
        let untouched = redis_round_trip(|| "page", async { 7 });
        assert!(matches!(untouched, Either::Left(_)));
        assert_eq!(untouched.await, 7);
        let mut callers = Callers::default();
        callers.push(Caller(None));
        assert!(callers.traced.capacity() == 0, "nothing allocated");
        assert!(matches!(report_batch(callers, async {}), Either::Left(_)));
    }

    #[test]
    fn the_report_queues_batches_are_reports() {
        assert_eq!(
            operation_of(
                "presence::store::redis::<impl presence::store::coalesce::SendBatch for presence::store::redis::Redis>::send::{{closure}}::{{closure}}"
            ),
            "report"
        );
    }
}
