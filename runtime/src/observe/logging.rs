//! Logging setup: human-readable or JSON lines on stderr, filtered by
//! `--log` (RUST_LOG syntax).

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

use crate::{
    config::LogFormat,
    error::{Error, Result},
};

/// Installs the global subscriber; call once, first thing.
pub(crate) fn init(format: LogFormat, filter: &str) -> Result<()> {
    let filter = EnvFilter::try_new(filter).map_err(|e| Error::Config(format!("--log {filter:?}: {e}")))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    installed.map_err(|e| Error::Config(format!("logging: {e}")))
}

/// Reports an error when logging itself could not be set up.
#[expect(clippy::print_stderr, reason = "there is no logger to report through")]
pub(crate) fn fatal(error: &Error) {
    eprintln!("aipod-runtime: {error}");
}
