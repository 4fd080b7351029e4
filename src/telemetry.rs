//! Logs: `tracing` events, filtered by `RUST_LOG` (default `info`), written
//! for people or as JSON lines for a log collector.

use tracing_subscriber::{EnvFilter, fmt};

use crate::settings::LogFormat;

/// Installs the global subscriber. Called once, by the binary; tests don't,
/// so they stay quiet.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a log file.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}
