//! Log lines that carry the trace id of the call they were written in.
//!
//! While a traced call is handled, its trace id is in a task-local (set by
//! the gRPC layer around the call's handler, and by the report queue
//! around a batch's Redis work, for the batch's first traced caller). The log formatter adds it to each line written meanwhile:
//! a `trace_id` field in JSON, ` trace_id=…` at the end of a text line. A
//! formatter cannot ask `tracing` for the current span while it formats
//! (the dispatcher is busy with the event), hence the task-local.

use std::{fmt, future::Future, sync::Arc};

use opentelemetry::trace::{SpanContext, TraceId};
use tokio::task::futures::TaskLocalFuture;
use tracing::{Event, Subscriber};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{Format, Full, Json, Writer},
    },
    registry::LookupSpan,
};

tokio::task_local! {
    static CALL: Call;
}

/// The traced call a task is working for.
#[derive(Clone)]
pub(crate) struct Call {
    pub trace_id: TraceId,
    /// Its server span: the parent of the Redis spans made meanwhile.
    pub span: tracing::Span,
    /// Set while the report queue sends a batch this call leads.
    pub batch: Option<Arc<Batch>>,
}

/// A coalesced report batch, as its Redis spans show it.
pub(crate) struct Batch {
    /// Reports it carries, from every caller.
    pub reports: usize,
    /// The other traced callers' spans, linked to.
    pub others: Vec<SpanContext>,
}

/// Runs `future` as part of `call`.
pub(crate) fn within<F: Future>(call: Call, future: F) -> TaskLocalFuture<Call, F> {
    CALL.scope(call, future)
}

/// The call the current task works for, if it is a traced one.
pub(crate) fn current() -> Option<Call> {
    CALL.try_with(Call::clone).ok()
}

fn current_trace_id() -> Option<TraceId> {
    CALL.try_with(|call| call.trace_id).ok()
}

/// A log format that adds the trace id to lines written within a traced
/// call.
pub(crate) struct WithTraceId<F> {
    inner: F,
}

impl WithTraceId<Format<Full>> {
    pub fn text(format: Format<Full>) -> Self {
        Self { inner: format }
    }
}

impl WithTraceId<Format<Json>> {
    pub fn json(format: Format<Json>) -> Self {
        Self { inner: format }
    }
}

/// Where the trace id goes in a line the inner format wrote.
trait Place {
    fn place(line: &mut String, trace_id: TraceId);
}

impl Place for Format<Full> {
    /// At the end, before the newline.
    fn place(line: &mut String, trace_id: TraceId) {
        let end = line.trim_end_matches('\n').len();
        line.insert_str(end, &format!(" trace_id={trace_id}"));
    }
}

impl Place for Format<Json> {
    /// As the object's first field (the line is one JSON object).
    fn place(line: &mut String, trace_id: TraceId) {
        if line.starts_with('{') {
            let separator = if line[1..].trim_start().starts_with('}') {
                ""
            } else {
                ","
            };
            line.insert_str(1, &format!("\"trace_id\":\"{trace_id}\"{separator}"));
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N> + Place,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let Some(trace_id) = current_trace_id() else {
            return self.inner.format_event(ctx, writer, event);
        };
        // Written to a buffer first (without colours), then placed.
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        F::place(&mut line, trace_id);
        writer.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn trace_id() -> TraceId {
        TraceId::from_hex(TRACE).expect("a trace id")
    }

    #[test]
    fn a_json_line_gets_a_trace_id_field() {
        let mut line = "{\"timestamp\":\"t\",\"level\":\"WARN\",\"message\":\"m\"}\n".to_owned();
        <Format<Json> as Place>::place(&mut line, trace_id());
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("still JSON");
        assert_eq!(parsed["trace_id"], TRACE);
        assert_eq!(parsed["message"], "m");
    }

    #[test]
    fn a_text_line_ends_with_the_trace_id() {
        let mut line = "2026-01-01T00:00:00Z  WARN presence: m x=1\n".to_owned();
        <Format<Full> as Place>::place(&mut line, trace_id());
        assert_eq!(
            line,
            format!("2026-01-01T00:00:00Z  WARN presence: m x=1 trace_id={TRACE}\n")
        );
    }

    #[tokio::test]
    async fn the_trace_id_is_known_within_a_call_only() {
        assert!(current_trace_id().is_none());
        let call = Call {
            trace_id: trace_id(),
            span: tracing::Span::none(),
            batch: None,
        };
        let inside = within(call, async { current_trace_id() }).await;
        assert_eq!(inside, Some(trace_id()));
        assert!(current_trace_id().is_none());
    }
}
