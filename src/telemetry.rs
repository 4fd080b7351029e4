//! Logs and traces. Logs: `tracing` events, filtered by `RUST_LOG` (default
//! `info`), written for people or as JSON lines for a log collector.
//! Traces: OpenTelemetry over OTLP when the standard `OTEL_*` variables ask
//! for it (see [`crate::traces`]); then each log line written within a
//! traced call carries its trace id.

use tracing_subscriber::{
    EnvFilter, Layer as _, filter::FilterExt as _, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::settings::LogFormat;
use crate::traces::{self, Pipeline, TracesConfig, WithTraceId};

/// What runs for logs and traces: keep it, and [`Telemetry::shutdown`] it
/// on the way out, so the last spans are sent.
pub struct Telemetry {
    traces: Option<Pipeline>,
}

/// An `OTEL_*` variable Presence cannot honour, or an exporter that cannot
/// be built from them.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0}")]
    Config(#[from] traces::ConfigError),
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Installs the global subscriber, and the trace pipeline if asked for.
/// Called once, by the binary, on its Tokio runtime; tests don't, so they
/// stay quiet.
pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let config = TracesConfig::from_env(|name| std::env::var(name).ok())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a log file.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let otlp = match config {
        TracesConfig::Off { reason } => {
            init_logs_only(format, filter, colours);
            tracing::info!(reason, "traces off");
            return Ok(Telemetry { traces: None });
        }
        TracesConfig::Otlp(otlp) => otlp,
    };

    let (pipeline, tracer) = Pipeline::start(&otlp)?;
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colours)
            .event_format(WithTraceId::text(fmt::format()))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_ansi(colours)
            .event_format(WithTraceId::json(
                fmt::format().json().flatten_event(true).with_current_span(false),
            ))
            .boxed(),
    };
    // Each layer has its own filter: RUST_LOG chooses the log lines, and
    // never which spans are exported.
    tracing_subscriber::registry()
        .with(logs.with_filter(filter.and(traces::not_our_spans())))
        .with(traces::layer(tracer))
        .init();
    traces::turn_on();
    tracing::info!(endpoint = %otlp.endpoint, sampler = %otlp.sampler, "traces exported over OTLP");
    Ok(Telemetry { traces: Some(pipeline) })
}

/// Logs as they were before traces existed, to the byte.
fn init_logs_only(format: LogFormat, filter: EnvFilter, colours: bool) {
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

impl Telemetry {
    /// Sends the spans still queued (within 2 s). Logs need
    /// nothing: each line is written as it happens.
    pub async fn shutdown(self) {
        if let Some(pipeline) = self.traces {
            pipeline.shutdown().await;
        }
    }
}
