//! `otlp-sink`: the smallest OTLP/gRPC trace collector, for benchmarks. It
//! accepts `opentelemetry.proto.collector.trace.v1.TraceService/Export` on
//! `--listen`, counts the export requests and the spans in them by name,
//! keeps nothing else, and on SIGTERM or SIGINT prints one line of JSON and
//! exits:
//!
//! ```text
//! {"export_requests":412,"spans":821733,"by_name":{"presence.v1.Presence/ReportUser":500000,"redis":321733}}
//! ```
//!
//! `bench/run` uses it to measure what exporting every call's spans costs
//! the service, with no real collector competing for the machine's cores.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use clap::Parser;
use tonic::{
    codegen::{BoxFuture, http},
    server::{Grpc, NamedService, UnaryService},
    transport::{Server, server::TcpIncoming},
};

#[derive(Parser)]
#[command(about = "An OTLP/gRPC trace sink that counts what it is sent")]
struct Args {
    /// Where to listen, e.g. 127.0.0.1:4317.
    #[arg(long)]
    listen: SocketAddr,
}

/// `ExportTraceServiceRequest`, down to each span's name: just enough to
/// count spans (prost skips every other field).
#[derive(Clone, PartialEq, prost::Message)]
struct Export {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(message, repeated, tag = "2")]
    spans: Vec<Span>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Span {
    #[prost(string, tag = "5")]
    name: String,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    by_name: Mutex<BTreeMap<String, u64>>,
}

/// The TraceService; its empty answer is an `ExportTraceServiceResponse`
/// with no partial success.
#[derive(Clone, Default)]
struct Sink(Arc<Counts>);

impl NamedService for Sink {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl UnaryService<Export> for Sink {
    type Response = ();
    type Future = BoxFuture<tonic::Response<()>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Export>) -> Self::Future {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        let mut by_name = self.0.by_name.lock().unwrap_or_else(|p| p.into_inner());
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans);
        for span in spans.flat_map(|s| s.spans) {
            *by_name.entry(span.name).or_default() += 1;
        }
        Box::pin(async { Ok(tonic::Response::new(())) })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Sink {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            if request.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                return Ok(tonic::Status::unimplemented("only Export").into_http());
            }
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::<(), Export>::default());
            Ok(grpc.unary(sink, request).await)
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("otlp-sink: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let sink = Sink::default();
    let counts = sink.0.clone();
    let served = Server::builder()
        .add_service(sink)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), presence::shutdown::signal())
        .await;
    let by_name = counts.by_name.lock().unwrap_or_else(|p| p.into_inner());
    let names: Vec<String> = by_name
        .iter()
        .map(|(name, count)| format!("{name:?}:{count}"))
        .collect();
    println!(
        "{{\"export_requests\":{},\"spans\":{},\"by_name\":{{{}}}}}",
        counts.requests.load(Ordering::Relaxed),
        by_name.values().sum::<u64>(),
        names.join(",")
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("otlp-sink: {error}");
            ExitCode::FAILURE
        }
    }
}
