//! Assembles and runs the gRPC server: the `ai.AI` service, health,
//! reflection (v1 and v1alpha), production HTTP/2 settings, and the drain
//! sequence that ends it.
//!
//! The folder is the network edge, the only place tonic lives:
//! `connection` (plaintext or `tls` connections, idle and connection caps),
//! `inbound` (every request body metered before a byte reaches a call),
//! `auth` (bearer tokens, which `reload` rebuilds when their files change),
//! `service` (the `ai.AI` service: frames to engine requests), `wire` (the
//! protocol's types to the runtime's and back) and `health`.

pub(crate) mod auth;
pub(crate) mod coalesce;
pub(crate) mod connection;
pub(crate) mod health;
pub(crate) mod inbound;
pub(crate) mod reload;
pub(crate) mod service;
pub(crate) mod tls;
pub(crate) mod wire;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::task::JoinSet;

use aipod::{contract, proto, telemetry::Exporting};
use tokio::net::TcpListener;
use tonic::{
    codec::CompressionEncoding,
    service::interceptor::InterceptedService,
    transport::{Server, server::TcpIncoming},
};

use crate::{
    config::Config,
    engine::{Engine, release},
    error::{Error, Result},
    observe::trace::Tracing,
    server::auth::Auth,
    server::connection::Gate,
    server::health::Health,
    server::inbound::Inbound,
    server::service::AiService,
    server::tls::{Tls, TlsFiles},
};

/// The largest reply message (a result's JSON must fit): what the aipod
/// clients accept.
const MAX_REPLY_MESSAGE: usize = contract::DEFAULT_MAX_MESSAGE_BYTES;
/// Streams beyond the call limits, for health checks, describe and refusals.
const STREAM_HEADROOM: usize = 256;
/// After the drain, how long open connections get to close by themselves.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Binds the listen address.
pub(crate) async fn bind(listen: &str) -> Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|source| Error::Bind { addr: listen.to_owned(), source })
}

/// Binds a side listener (metrics, health) at `listen`, logging `what` with
/// its address; `None` when `listen` is empty (off).
async fn side_listener(listen: &str, what: &str) -> Result<Option<TcpListener>> {
    let listen = listen.trim();
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = bind(listen).await?;
    let addr = listener.local_addr().map_err(|source| Error::Bind { addr: listen.to_owned(), source })?;
    tracing::info!(%addr, "{what}");
    Ok(Some(listener))
}

/// The plaintext connections of `listener`: no Nagle delay, TCP keepalive.
fn tcp_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(contract::TCP_KEEPALIVE))
}

/// At exit, how long spans still queued get to reach the collector.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

/// Turns trace export on when the `OTEL_*` environment asks for it.
fn start_tracing(engine: &mut Engine) -> Result<Option<Exporting>> {
    let metrics = Arc::clone(&engine.metrics);
    let on_drop: aipod::telemetry::OnDrop = Arc::new(move |spans| metrics.spans_dropped(spans));
    let exporting = Exporting::from_env("aipod-runtime", on_drop).map_err(Error::Config)?;
    if let Some(exporting) = &exporting {
        tracing::info!(endpoint = exporting.endpoint(), "exporting call traces (OTLP/gRPC)");
        engine.tracing = Tracing::on(exporting.tracer("aipod-runtime"));
    }
    Ok(exporting)
}

/// Serves on `listener` until `shutdown` resolves, then drains: readiness
/// turns NOT_SERVING, new calls get UNAVAILABLE, in-flight calls finish
/// (up to the drain timeout), and the server stops.
pub(crate) async fn serve(
    config: &Config,
    engine: Engine,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr: SocketAddr =
        listener.local_addr().map_err(|source| Error::Bind { addr: config.listen.clone(), source })?;
    let mut engine = engine;
    let exporting = start_tracing(&mut engine)?;
    let inbound = Inbound::new(config.max_message_bytes, config.max_kwargs_bytes, config.decode_backlog_budget)?;
    let engine = Arc::new(engine);
    let auth = config.auth_token_file.as_deref().map(Auth::load).transpose()?.map(Arc::new);
    let tls =
        TlsFiles::from_flags(config.tls_cert.as_deref(), config.tls_key.as_deref(), config.tls_client_ca.as_deref())?
            .map(Tls::load)
            .transpose()?
            .map(Arc::new);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(reporter).await;

    // Every task beside the gRPC server, stopped together at the end.
    let mut tasks = JoinSet::new();
    if let Some(auth) = &auth {
        tasks.spawn(Arc::clone(auth).watch());
    }
    if let Some(tls) = &tls {
        tasks.spawn(Arc::clone(tls).watch());
    }
    if let Some(admin) = side_listener(&config.metrics_listen, "metrics listening on /metrics").await? {
        tasks.spawn(serve_admin(admin, Arc::clone(&engine), Arc::clone(&inbound)));
    }
    let plain_health = "health listening (plaintext, grpc.health.v1.Health only)";
    if let Some(plain) = side_listener(&config.health_listen, plain_health).await? {
        let server = Server::builder().layer(Gate::default()).add_service(health_service.clone());
        tasks.spawn(async move {
            if let Err(e) = server.serve_with_incoming(tcp_incoming(plain)).await {
                tracing::error!(error = %e, "the health listener stopped");
            }
        });
    }
    tasks.spawn(health.clone().follow(Arc::clone(&engine)));
    tasks.spawn(Arc::clone(&engine.retention).run_sweeper());
    if !config.memory_release_delay.is_zero() {
        tasks.spawn(release::after_bursts(engine.drain.activity(), config.memory_release_delay));
    }

    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let max_message = usize::try_from(config.max_message_bytes).unwrap_or(usize::MAX);
    let ai = proto::ai_server::AiServer::new(AiService::new(Arc::clone(&engine), auth.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(MAX_REPLY_MESSAGE)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = with_connection_age(Server::builder(), config)
        .layer(Gate::metering(Arc::clone(&inbound)))
        .max_concurrent_streams(Some(max_streams(&engine)))
        .http2_keepalive_interval(Some(contract::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(contract::KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(config.http2_stream_window)
        .initial_connection_window_size(config.http2_connection_window)
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection_v1, authenticate(auth.clone())))
        .add_service(InterceptedService::new(reflection_v1alpha, authenticate(auth.clone())))
        .add_service(ai);
    let stop = async {
        let _ = stop_rx.await;
    };
    // TLS or not, one accept loop; never plaintext when TLS was asked for.
    let idle = Some(config.idle_timeout).filter(|d| !d.is_zero());
    let incoming = connection::incoming(listener, tls.clone(), idle, config.max_connections, Arc::clone(&engine.drain));
    let server = router.serve_with_incoming_shutdown(incoming, stop);
    log_listening(addr, &engine, tls.as_deref());

    // Models start while the server listens: probes see NOT_SERVING until
    // they are ready. A model that cannot start stops the runtime.
    let mut startup_failure = None;
    let drain = async {
        let startup = start_models(&engine);
        tokio::pin!(startup, shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            r = &mut startup => match r {
                Ok(()) => shutdown.await,
                Err(e) => {
                    tracing::error!(error = %e, "stopping: a model could not start");
                    startup_failure = Some(e);
                }
            },
        }
        engine.drain_calls(config.drain_timeout, health.set_ready(false)).await;
        let _ = stop_tx.send(());
    };

    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => Some(r),
        () = drain => None,
    };
    let result = match served {
        Some(r) => r.map_err(Error::from),
        None => match tokio::time::timeout(CLOSE_GRACE, &mut server).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => {
                tracing::info!("closing connections that stayed open");
                Ok(())
            }
        },
    };
    tasks.shutdown().await;
    for version in engine.versions.iter() {
        version.model.shutdown().await;
    }
    if let Some(exporting) = exporting {
        exporting.flush(TRACE_FLUSH).await;
    }
    tracing::info!("aipod-runtime stopped");
    match startup_failure {
        Some(e) => Err(e),
        None => result,
    }
}

/// The reflection services, v1 and v1alpha, over the `ai` and health
/// protocols.
fn reflection() -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let failed = |e| Error::Internal(format!("reflection: {e}"));
    Ok((builder().build_v1().map_err(failed)?, builder().build_v1alpha().map_err(failed)?))
}

/// Says where the server listens and what it serves.
fn log_listening(addr: SocketAddr, engine: &Engine, tls: Option<&Tls>) {
    tracing::info!(
        %addr,
        spool = %engine.spool.root().display(),
        versions = ?engine.versions.iter().map(|v| format!("{}={}", v.name, v.spec)).collect::<Vec<_>>(),
        heartbeat_ms = engine.heartbeat.map_or(0, |d| d.as_millis() as u64),
        tls = match tls {
            None => "off",
            Some(t) if t.mutual() => "mutual",
            Some(_) => "on",
        },
        "aipod-runtime listening"
    );
}

/// An interceptor that lets a request through when `auth` is off or it
/// carries an accepted bearer token (reflection is behind the same check as
/// calls and describe).
fn authenticate(
    auth: Option<Arc<Auth>>,
) -> impl FnMut(tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request: tonic::Request<()>| {
        if let Some(auth) = &auth {
            auth.check(request.metadata().get("authorization").map(|v| v.as_bytes()))
                .map_err(crate::server::wire::status)?;
        }
        Ok(request)
    }
}

/// The plain-HTTP admin listener: Prometheus `/metrics` and `/healthz`;
/// any other path is a 404.
async fn serve_admin(listener: TcpListener, engine: Arc<Engine>, inbound: Arc<Inbound>) {
    use axum::{Router, http::header, routing::get};
    const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    let app = Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/metrics",
        get(move || {
            let (engine, inbound) = (Arc::clone(&engine), Arc::clone(&inbound));
            async move {
                let held = crate::observe::metrics::Held {
                    receive_buffer: inbound.buffered(),
                    awaiting_header: inbound.awaiting(),
                    decode_backlog: inbound.backlog(),
                    ..Default::default()
                };
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], engine.render_metrics(held))
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener stopped");
    }
}

/// Streams one connection may open: every call the versions can run or
/// queue (so a client that multiplexes them on one connection gets the
/// server's own RESOURCE_EXHAUSTED, not a stall), plus room for probes.
/// `server` with `--max-connection-age`: GOAWAY once a connection is that
/// old times a jitter in 0.9..1.1 drawn now (pods started together do not
/// send their clients away together); its calls then have up to
/// `--max-call-duration` to finish, or forever when that is off.
fn with_connection_age(server: Server, config: &Config) -> Server {
    use std::hash::{BuildHasher as _, Hasher as _};
    if config.max_connection_age.is_zero() {
        return server;
    }
    let draw = std::collections::hash_map::RandomState::new().build_hasher().finish() % 2001;
    let jitter = 0.9 + draw as f64 / 10_000.0;
    let age = config.max_connection_age.mul_f64(jitter);
    let server = server.max_connection_age(age);
    match config.max_call_duration {
        d if d.is_zero() => server,
        d => server.max_connection_age_grace(d),
    }
}

fn max_streams(engine: &Engine) -> u32 {
    u32::try_from(engine.max_calls().saturating_add(STREAM_HEADROOM)).unwrap_or(u32::MAX)
}

/// Starts every version's model at once; the first failure wins.
async fn start_models(engine: &Engine) -> Result<()> {
    let mut starting = tokio::task::JoinSet::new();
    for version in engine.versions.iter() {
        let name = version.name.clone();
        let start = version.model.start();
        starting.spawn(async move { start.await.map_err(|message| Error::Startup { version: name, message }) });
    }
    while let Some(done) = starting.join_next().await {
        done.map_err(|e| Error::Internal(format!("starting a model: {e}")))??;
    }
    Ok(())
}
