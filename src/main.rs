//! The `presence` binary: read the settings, start the logs (and traces,
//! if asked for), serve until SIGTERM or SIGINT. Everything else is in the
//! library.

use std::process::ExitCode;

use presence::{Application, Settings, shutdown, telemetry};

/// Every call allocates a little (HTTP/2 frames, the request, the reply):
/// mimalloc's per-thread free lists serve those without the locks and the
/// `malloc_consolidate` passes glibc's allocator spent ~12 % of the CPU on
/// in a profile of unique reports.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // A bad flag or variable ends here, with clap's message and exit code 2.
    let settings = Settings::from_env_and_args();
    // So does an OTEL_* variable Presence cannot honour.
    let telemetry = match telemetry::init(settings.log_format) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };

    let outcome = match Application::build(settings).await {
        Ok(application) => match application.run_until_stopped(shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(%error, "stopped on an error");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            tracing::error!(%error, "cannot start");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    outcome
}
