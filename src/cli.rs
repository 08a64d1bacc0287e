//! The `aipod` command-line tool: `call`, `attach`, `describe`, `health`.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use clap::Parser;

use crate::client::{CallError, Client, ClientOptions, Output, Payload, RetryPolicy};

pub mod args;
pub mod exit;
mod health;
pub mod progress;
pub mod reference;

use args::{AttachArgs, CallArgs, Cli, Command, ServerArgs, TlsArgs};

/// Runs the CLI with the process's arguments.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = if cli.verbose { "aipod=debug" } else { "aipod=warn" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    let tracing = start_tracing();
    let code = match cli.command {
        Command::Call(args) => call(args, cli.verbose).await,
        Command::Attach(args) => attach(args, cli.verbose).await,
        Command::Describe { target, upstream, token, tls } => {
            describe(&target, upstream, token, &tls, cli.verbose).await
        }
        Command::Health { target, service, http, timeout, wait, tls } => {
            let check =
                health::Check { target: &target, service: &service, http: http.as_deref(), timeout, wait, tls: &tls };
            health::run(check, cli.verbose).await
        }
        Command::CliReference => match std::io::stdout().lock().write_all(reference::markdown().as_bytes()) {
            Ok(()) => 0,
            Err(_) => exit::code(&CallError::local("cannot write to stdout")),
        },
    };
    if let Some(exporting) = tracing {
        exporting.flush(TRACE_FLUSH).await;
    }
    ExitCode::from(code)
}

/// At exit, how long the call's span gets to reach the collector.
const TRACE_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// Exports the call's CLIENT span when the `OTEL_*` environment asks for
/// it (the same variables as the runtime's); an unusable configuration is
/// reported and the call goes on untraced.
#[expect(clippy::print_stderr, reason = "the CLI reports errors on stderr")]
fn start_tracing() -> Option<crate::telemetry::Exporting> {
    match crate::telemetry::Exporting::from_env("aipod", std::sync::Arc::new(|_| {})) {
        Ok(Some(exporting)) => {
            opentelemetry::global::set_tracer_provider(exporting.provider().clone());
            Some(exporting)
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!("aipod: tracing is off: {e}");
            None
        }
    }
}

/// The trace a call continues: `TRACEPARENT` (and `TRACESTATE`) from the
/// environment, the OpenTelemetry convention for processes started by a
/// traced one; `None` when unset or malformed.
fn trace_parent_from_env() -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt as _;
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (var, key) in [("TRACEPARENT", "traceparent"), ("TRACESTATE", "tracestate")] {
        if let Some(v) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            metadata.insert(key, v);
        }
    }
    let cx = crate::telemetry::extract(&metadata);
    cx.span().span_context().is_valid().then_some(cx)
}

#[expect(clippy::print_stderr, reason = "the CLI reports errors on stderr")]
fn fail(e: &CallError, verbose: bool) -> u8 {
    eprintln!("aipod: {e}");
    if verbose {
        let phase = e.phase.map_or("-", |p| p.as_str_name().trim_start_matches("PHASE_"));
        let kind = match e.kind {
            crate::client::ErrorKind::Connect => "no connection",
            crate::client::ErrorKind::Status => "the server's answer",
            crate::client::ErrorKind::Local => "on this side",
            crate::client::ErrorKind::Protocol => "a malformed answer",
        };
        eprintln!(
            "  code {} | call id {} | phase {phase} | attempts {} | failure: {kind}",
            e.code_name(),
            e.call_id.as_deref().unwrap_or("-"),
            e.attempts,
        );
    }
    exit::code(e)
}

#[expect(clippy::print_stderr, reason = "the CLI reports usage errors on stderr")]
fn usage(message: &str) -> u8 {
    eprintln!("aipod: {message}");
    exit::USAGE
}

async fn call(args: CallArgs, verbose: bool) -> u8 {
    let kwargs = match args::kwargs(args.kwargs_json.as_deref(), &args.kw) {
        Ok(k) => k,
        Err(message) => return usage(&message),
    };
    let client = match connect(&args.server).await {
        Ok(c) => c,
        Err(e) => return fail(&e, verbose),
    };
    let payload = match args.file {
        None => Payload::None,
        Some(p) if p.as_os_str() == "-" => Payload::Reader(Box::new(tokio::io::stdin())),
        Some(p) => Payload::File(p),
    };
    let display = progress::Display::new(!args.quiet && std::io::stderr().is_terminal());
    let mut call = client
        .call(&args.func)
        .payload(payload)
        .compression(if args.no_compress { crate::codec::Compression::Off } else { args.zstd_level })
        .idempotent(args.idempotent)
        .retry(RetryPolicy { max_attempts: args.attempts, ..RetryPolicy::default() })
        .on_progress({
            let display = display.clone();
            move |p| display.update(p)
        });
    call = match call.kwargs(&kwargs) {
        Ok(c) => c,
        Err(e) => return fail(&e, verbose),
    };
    if let Some(v) = args.version {
        call = call.version(v);
    }
    let call_id = match (args.retain, args.call_id) {
        (Some(_), None) => Some(crate::client::new_call_id()),
        (_, id) => id,
    };
    if let Some(retain) = args.retain {
        let id = call_id.as_deref().unwrap_or_default();
        announce(&format!(
            "retained call {id} (kept {} without a client; pick it up with: aipod attach {id})",
            crate::duration::format(retain)
        ));
        call = call.retain(retain);
    }
    if let Some(id) = call_id {
        call = call.call_id(id);
    }
    if let Some(t) = args.timeout {
        call = call.timeout(t);
    }
    if let Some(out) = args.out {
        call = call.output(Output::File(out));
    }
    if let Some(parent) = trace_parent_from_env() {
        call = call.trace_parent(parent);
    }
    finish(call.send().await, &display, verbose)
}

/// Ends a call or an attach: its result JSON on stdout, or its error.
fn finish(result: Result<crate::client::CallOutput, CallError>, display: &progress::Display, verbose: bool) -> u8 {
    display.finish();
    match result {
        Ok(out) => match out.json::<serde_json::Value>() {
            Ok(json) => print_json(&json),
            Err(e) => fail(&e, verbose),
        },
        Err(e) => fail(&e, verbose),
    }
}

#[expect(clippy::print_stderr, reason = "the CLI reports on stderr")]
fn announce(line: &str) {
    eprintln!("aipod: {line}");
}

async fn attach(args: AttachArgs, verbose: bool) -> u8 {
    let client = match connect(&args.server).await {
        Ok(c) => c,
        Err(e) => return fail(&e, verbose),
    };
    let display = progress::Display::new(!args.quiet && std::io::stderr().is_terminal());
    let mut call = client.attach(&args.call_id).on_progress({
        let display = display.clone();
        move |p| display.update(p)
    });
    // Reattaching after a broken stream goes on this long.
    call = call.retain(args.timeout.unwrap_or(ATTACH_PATIENCE));
    if let Some(t) = args.timeout {
        call = call.timeout(t);
    }
    if let Some(out) = args.out {
        call = call.output(Output::File(out));
    }
    finish(call.send().await, &display, verbose)
}

/// How long `aipod attach` keeps reattaching by default.
const ATTACH_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A client for the server of a call or attach: its token and upstream.
async fn connect(server: &ServerArgs) -> Result<Client, CallError> {
    let client = connect_to(&server.target, server.token.as_deref(), &server.tls).await?;
    Ok(match &server.upstream {
        Some(u) => client.with_upstream(u.clone()),
        None => client,
    })
}

/// A client for `target`, sending `token` when there is one.
async fn connect_to(target: &str, token: Option<&str>, tls: &TlsArgs) -> Result<Client, CallError> {
    let client = Client::connect_tls(target, ClientOptions::default(), tls.options()?).await?;
    match token.filter(|t| !t.trim().is_empty()) {
        Some(t) => client.with_token(t),
        None => Ok(client),
    }
}

async fn describe(target: &str, upstream: Option<String>, token: Option<String>, tls: &TlsArgs, verbose: bool) -> u8 {
    let client = match connect_to(target, token.as_deref(), tls).await {
        Ok(c) => c,
        Err(e) => return fail(&e, verbose),
    };
    let client = match upstream {
        Some(u) => client.with_upstream(u),
        None => client,
    };
    match client.describe().await {
        Ok(d) => {
            let limits = d.limits.unwrap_or_default();
            let json = serde_json::json!({
                "server_version": d.server_version,
                "draining": d.draining,
                "heartbeat_interval_ms": d.heartbeat_interval_ms,
                "features": d.features,
                "versions": d.versions.iter().map(|v| serde_json::json!({
                    "version": v.version, "default": v.default, "ready": v.ready, "spec": v.spec, "functions": v.functions,
                })).collect::<Vec<_>>(),
                "limits": {
                    "max_payload_bytes": limits.max_payload_bytes,
                    "max_kwargs_bytes": limits.max_kwargs_bytes,
                    "max_message_bytes": limits.max_message_bytes,
                    "max_concurrent_calls": limits.max_concurrent_calls,
                    "max_queued_calls": limits.max_queued_calls,
                },
            });
            print_json(&json)
        }
        Err(e) => fail(&e, verbose),
    }
}

/// Prints JSON: pretty on a terminal, one line otherwise.
fn print_json(value: &serde_json::Value) -> u8 {
    let stdout = std::io::stdout();
    let text = if stdout.is_terminal() { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) };
    let mut lock = stdout.lock();
    match text.map(|t| writeln!(lock, "{t}")) {
        Ok(Ok(())) => 0,
        _ => exit::code(&CallError::local("cannot write to stdout")),
    }
}
