//! The `presence` binary: read the settings, start the logs, serve until
//! SIGTERM or SIGINT. Everything else is in the library.

use std::process::ExitCode;

use presence::{Application, Settings, shutdown, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    // A bad flag or variable ends here, with clap's message and exit code 2.
    let settings = Settings::from_env_and_args();
    telemetry::init(settings.log_format);

    let application = match Application::build(settings).await {
        Ok(application) => application,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match application.run_until_stopped(shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "stopped on an error");
            ExitCode::FAILURE
        }
    }
}
