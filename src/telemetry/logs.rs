//! The log subscriber: human lines (colour only on a terminal) or JSON lines, filtered by
//! `RUST_LOG`. Secrets never reach a log call: the config's `Debug` redacts them and errors
//! carry URLs through `config::redact_url`.

use std::io::IsTerminal as _;

/// How log lines are written (`--log-format`, or `WALDEN_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people; coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// What is logged without `RUST_LOG`: walden's own progress, every library's warnings, and each
/// retry of an object-store request (otherwise a store in trouble would leave walden silent
/// for as long as the store client keeps retrying one request).
const DEFAULT_LOG_FILTER: &str =
    "warn,walden=info,object_store::client::retry=info,deltalake_core::operations::merge=error";

/// Installs the log subscriber for the process (a second call does nothing).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
