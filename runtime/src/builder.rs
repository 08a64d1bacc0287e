//! The runtime as a library: a program registers its own models under
//! version names and serves them — with everything the `aipod-runtime`
//! binary offers (flags, `AIPOD_*` variables, health, reflection, heartbeats,
//! drain) — from a `main` of a few lines:
//!
//! ```no_run
//! # use aipod_runtime::{BoxFuture, Model, ModelCall, ModelError, ModelOutput, Runtime};
//! struct Hello;
//!
//! impl Model for Hello {
//!     fn functions(&self) -> Vec<String> {
//!         vec!["hello".into()]
//!     }
//!     fn call(&self, call: ModelCall) -> BoxFuture<Result<ModelOutput, ModelError>> {
//!         Box::pin(async move { Ok(ModelOutput::json(serde_json::json!({"hello": call.kwargs}))) })
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     Runtime::builder().model("v1", Hello).serve_from_env().await
//! }
//! ```

use std::{any::type_name, future::Future, process::ExitCode, sync::Arc};

use clap::Parser;
use tokio::net::TcpListener;

use crate::{
    config::Config,
    engine::Engine,
    engine::drain::Signals,
    error::{Error, Result},
    model::Model,
    observe::logging,
    server,
    versions::Registered,
};

/// A runtime being put together: the models a program registers, served
/// with the ones the flags name (`--model`). With neither, it serves the
/// built-in demo model.
#[derive(Default)]
pub struct Runtime {
    registered: Vec<Registered>,
}

/// Sets glibc's allocator up for a long-running server: at most one
/// arena per core, and buffers of 1 MiB and more mapped on their own and
/// unmapped when freed — what keeps a 4 GiB upload within ~16 MiB
/// (`docs/runtime.md`, where a big upload's bytes sit). Settings the
/// environment already makes (`MALLOC_ARENA_MAX`, `GLIBC_TUNABLES`) stand;
/// other C libraries are left alone. Call it first in `main`, before the
/// tokio runtime starts its threads: [`Runtime::serve`] calls it too, but
/// by then every thread that allocated already holds an arena.
pub fn tune_allocator() {
    crate::engine::release::tune();
}

impl Runtime {
    /// A runtime with no model of its own yet.
    pub fn builder() -> Self {
        Self::default()
    }

    /// Serves `model` as `version` (1–63 of `A-Z a-z 0-9 . _ -`). The first
    /// registered version is the default unless `--default-version` says
    /// otherwise. It runs up to `--max-concurrent-calls` calls at once.
    pub fn model(self, version: impl Into<String>, model: impl Model) -> Self {
        let spec = format!("rust:{}", type_name_of(&model));
        self.register(version.into(), spec, Arc::new(model))
    }

    /// Like [`Runtime::model`] for a model the program shares elsewhere.
    pub fn shared_model(self, version: impl Into<String>, model: Arc<dyn Model>) -> Self {
        self.register(version.into(), "rust".to_owned(), model)
    }

    fn register(mut self, version: String, spec: String, model: Arc<dyn Model>) -> Self {
        self.registered.push(Registered { version, spec, model });
        self
    }

    /// What the `aipod-runtime` binary does: reads the flags and `AIPOD_*`
    /// variables, starts logging, serves until SIGTERM or SIGINT, drains,
    /// and returns the exit code (2 for bad flags, 1 for any other failure;
    /// a second signal exits at once with 130).
    pub async fn serve_from_env(self) -> ExitCode {
        let config = Config::parse();
        if let Err(e) = logging::init(config.log_format, &config.log) {
            logging::fatal(&e);
            return ExitCode::from(2);
        }
        match self.serve_until_signal(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "aipod-runtime failed");
                ExitCode::from(if matches!(e, Error::Config(_)) { 2 } else { 1 })
            }
        }
    }

    async fn serve_until_signal(self, config: Config) -> Result<()> {
        let mut signals = Signals::install().map_err(|e| Error::Internal(format!("signal handlers: {e}")))?;
        let listener = bind(&config.listen).await?;
        let shutdown = async move {
            let signal = signals.next().await;
            tracing::info!(signal, "shutdown requested; send it again to exit at once");
            tokio::spawn(async move {
                let signal = signals.next().await;
                tracing::warn!(signal, "second signal: exiting now");
                std::process::exit(130);
            });
        };
        self.serve(&config, listener, shutdown).await
    }

    /// Serves on `listener` with `config` until `shutdown` resolves, then
    /// drains: readiness turns NOT_SERVING, new calls get UNAVAILABLE,
    /// in-flight calls finish (up to the drain timeout), and it returns.
    /// Logging is the caller's (see [`Runtime::serve_from_env`]).
    pub async fn serve(self, config: &Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<()> {
        // Once per process: the binary did it before any thread started;
        // an embedding program that did not gets it now, before calls
        // start threads of their own.
        crate::engine::release::tune().log();
        let port = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen.clone(), source })?.port();
        let engine = Engine::build(config, &self.registered, port)?;
        server::serve(config, engine, listener, shutdown).await
    }
}

/// Binds `listen` (`HOST:PORT`), for [`Runtime::serve`].
pub async fn bind(listen: &str) -> Result<TcpListener> {
    server::bind(listen).await
}

fn type_name_of<T>(_: &T) -> &'static str {
    type_name::<T>()
}
