//! The span pipeline when traces are on: the SDK's batch processor in front
//! of the OTLP/gRPC exporter.
//!
//! The batch processor runs in a thread of its own, where there is no Tokio
//! runtime, and the gRPC exporter (tonic) needs one: so each export is
//! handed to the service's runtime, and the processor's thread waits for
//! it. Calls never wait for an export: a finished span goes into the
//! processor's bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`), and is dropped
//! if the queue is full.

use std::{future::Future, sync::Arc, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter},
};
use tokio::runtime::Handle;

use super::config::Otlp;

/// The name Presence's spans are reported under (the instrumentation
/// scope), and the service's name when the operator gives none.
const NAME: &str = "presence";

/// How long the exit may wait for the last spans to be sent (a collector
/// that is down must not hold a pod's termination for long).
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// The running pipeline. [`Pipeline::shutdown`] sends what is queued.
pub struct Pipeline {
    provider: SdkTracerProvider,
}

impl Pipeline {
    /// Builds the exporter (which connects lazily: a collector that is not
    /// up yet is not an error) and the batch processor. Must be called on
    /// the service's Tokio runtime.
    pub fn start(otlp: &Otlp) -> Result<(Self, SdkTracer), opentelemetry_otlp::ExporterBuildError> {
        // The endpoint, headers, timeout and compression come from the
        // standard variables, read by the exporter itself.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .build()?;
        let exporter = OnRuntime {
            exporter: Arc::new(exporter),
            runtime: Handle::current(),
        };
        // OTEL_BSP_* are read here.
        let processor = BatchSpanProcessor::builder(exporter).build();
        // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read here, and
        // OTEL_TRACES_SAMPLER(_ARG) by the provider's builder.
        let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
        if !otlp.service_named {
            resource = resource.with_service_name(NAME);
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer(NAME);
        Ok((Self { provider }, tracer))
    }

    /// Sends the spans still queued, within [`FLUSH_AT_EXIT`], and stops
    /// the processor's thread.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // The provider's shutdown blocks until the processor's thread has
        // exported, and that export runs on this runtime: so it waits on a
        // blocking thread, not on one of the runtime's workers.
        let shutdown = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_AT_EXIT));
        match tokio::time::timeout(FLUSH_AT_EXIT + Duration::from_secs(1), shutdown).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "traces: the last spans may not have been sent"),
            Ok(Err(error)) => tracing::warn!(%error, "traces: the exporter's shutdown failed"),
            Err(_) => tracing::warn!("traces: the last spans were not sent in time"),
        }
    }
}

/// An exporter whose exports run on a Tokio runtime, whatever thread asks.
#[derive(Debug)]
struct OnRuntime<E> {
    exporter: Arc<E>,
    runtime: Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let exporter = self.exporter.clone();
        let export = self.runtime.spawn(async move { exporter.export(batch).await });
        async move {
            export
                .await
                .unwrap_or_else(|error| Err(OTelSdkError::InternalFailure(format!("export task: {error}"))))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once, as the provider is built, before any export holds a
        // second reference.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}
