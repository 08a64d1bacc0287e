//! The `aipod-runtime` binary: parse flags, start logging, serve until a
//! signal, drain. A second signal exits at once.

use std::process::ExitCode;

use aipod_runtime::{Config, drain::Signals, logging, server};
use clap::Parser;

#[tokio::main]
#[expect(clippy::print_stderr, reason = "reports that logging itself could not be set up")]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = logging::init(config.log_format, &config.log) {
        eprintln!("aipod-runtime: {e}");
        return ExitCode::from(2);
    }
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "aipod-runtime failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> aipod_runtime::Result<()> {
    let mut signals =
        Signals::install().map_err(|e| aipod_runtime::Error::Internal(format!("signal handlers: {e}")))?;
    let listener = server::bind(&config.listen).await?;
    let shutdown = async move {
        let signal = signals.next().await;
        tracing::info!(signal, "shutdown requested; send it again to exit at once");
        tokio::spawn(async move {
            let signal = signals.next().await;
            tracing::warn!(signal, "second signal: exiting now");
            std::process::exit(130);
        });
    };
    server::serve(&config, listener, shutdown).await
}
