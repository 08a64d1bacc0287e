//! The client library: connect with production defaults, then call any
//! model function with a payload streamed from a file, bytes or any reader,
//! follow heartbeats, and receive the result payload into a file or writer.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = aipod::Client::connect("http://127.0.0.1:50051").await?;
//! let out = client.call("sha256").file("big.bin").send().await?;
//! println!("{}", out.json::<serde_json::Value>()?["sha256"]);
//! # Ok(()) }
//! ```
//!
//! Its modules: `call` (the public types of a call; its builder, attempt
//! loops, upload and replies in `call/`), `error` (what a failed call
//! reports), `retry` (the policy and what may be retried) and `trace` (a
//! call's span, with the `otel` feature).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{contract, proto};

pub mod call;
pub mod error;
pub mod retry;
mod trace;

pub use call::{CallBuilder, CallOutput, Output, Payload, Progress, new_call_id};
pub use error::{CallError, ErrorKind};
pub use retry::RetryPolicy;

/// Connection and call defaults; every field can be overridden.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// HTTP/2 keepalive ping interval, also while idle.
    pub keepalive_interval: Duration,
    /// How long a ping may stay unanswered.
    pub keepalive_timeout: Duration,
    /// TCP keepalive.
    pub tcp_keepalive: Duration,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Largest gRPC message accepted from the server.
    pub max_message_bytes: usize,
    /// Default retry policy of calls.
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            keepalive_interval: contract::KEEPALIVE_INTERVAL,
            keepalive_timeout: contract::KEEPALIVE_TIMEOUT,
            tcp_keepalive: contract::TCP_KEEPALIVE,
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: contract::DEFAULT_MAX_MESSAGE_BYTES,
            retry: RetryPolicy::default(),
        }
    }
}

/// TLS for `https://` targets: whom to trust and, for servers that require
/// mutual TLS, who this client is. PEM throughout.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// CA certificates the server's certificate must chain to; default:
    /// the system's trusted roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and its private key.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry; default: the target's
    /// host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity_pem.is_some()) // never the key
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsOptions {
    /// Reads the CA (`ca`) and the client certificate and key (`cert`,
    /// `key`, both or neither) from files; errors name the file.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self, CallError> {
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| CallError::local(format!("cannot read the {what} {}: {e}", p.display())))
        };
        let identity_pem = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((read("client certificate", c)?, read("client key", k)?)),
            (Some(c), None) => {
                return Err(CallError::local(format!("the client certificate {} needs its key", c.display())));
            }
            (None, Some(k)) => {
                return Err(CallError::local(format!("the client key {} needs its certificate", k.display())));
            }
        };
        Ok(Self { ca_pem: ca.map(|p| read("CA certificate", p)).transpose()?, identity_pem, domain: None })
    }

    fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.identity_pem.is_none() && self.domain.is_none()
    }

    fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// A connection to an aipod server (or a router in front of several).
/// Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: proto::ai_client::AiClient<Channel>,
    channel: Channel,
    options: ClientOptions,
    upstream: Option<String>,
    /// `Bearer TOKEN`, sent as `authorization` with every call and describe.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// The target as given, for error messages.
    target: String,
    /// Per upstream (`None`: the server itself), whether it serves the
    /// one-message `call` — its `describe` lists it; shared by clones.
    one_message: Arc<Mutex<HashMap<Option<String>, bool>>>,
}

impl Client {
    /// Connects to `target` (`http://host:port`; a bare `host:port` means
    /// plain HTTP/2) with the default options.
    pub async fn connect(target: &str) -> Result<Self, CallError> {
        Self::connect_with(target, ClientOptions::default()).await
    }

    /// Connects with explicit options. The connection is made lazily, so a
    /// server that is briefly down does not fail the client, only calls.
    /// An `https://` target is reached over TLS trusting the system's roots.
    pub async fn connect_with(target: &str, options: ClientOptions) -> Result<Self, CallError> {
        Self::connect_tls(target, options, TlsOptions::default()).await
    }

    /// Connects to an `https://` target with explicit TLS settings (a
    /// private CA, a client certificate). TLS settings with a plaintext
    /// target are an error: nothing is sent in the clear by mistake.
    pub async fn connect_tls(target: &str, options: ClientOptions, tls: TlsOptions) -> Result<Self, CallError> {
        let uri = if target.contains("://") { target.to_owned() } else { format!("http://{target}") };
        let secure = uri.starts_with("https://");
        if !secure && !tls.is_empty() {
            return Err(CallError::new(
                ErrorKind::Local,
                tonic::Code::InvalidArgument,
                format!("TLS settings (CA, client certificate) need an https:// target, not {target:?}"),
            ));
        }
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| {
                CallError::new(
                    ErrorKind::Connect,
                    tonic::Code::InvalidArgument,
                    format!("invalid target {target:?}: {e}"),
                )
            })?
            .http2_keep_alive_interval(options.keepalive_interval)
            .keep_alive_timeout(options.keepalive_timeout)
            .keep_alive_while_idle(true)
            .tcp_keepalive(Some(options.tcp_keepalive))
            .tcp_nodelay(true)
            .connect_timeout(options.connect_timeout)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20));
        let endpoint = if secure {
            endpoint.tls_config(tls.config()).map_err(|e| {
                CallError::new(ErrorKind::Local, tonic::Code::InvalidArgument, format!("TLS settings: {e}"))
            })?
        } else {
            endpoint
        };
        let channel = endpoint.connect_lazy();
        let grpc = proto::ai_client::AiClient::new(channel.clone())
            .max_decoding_message_size(options.max_message_bytes)
            .max_encoding_message_size(options.max_message_bytes);
        Ok(Self {
            grpc,
            channel,
            options,
            upstream: None,
            authorization: None,
            target: target.to_owned(),
            one_message: Arc::default(),
        })
    }

    /// Sends `x-upstream: upstream` with every call and `describe` (a call
    /// can still name its own): for talking to one model through a router.
    pub fn with_upstream(mut self, upstream: impl Into<String>) -> Self {
        self.upstream = Some(upstream.into());
        self
    }

    /// Sends `authorization: Bearer TOKEN` with every call and `describe`,
    /// for a runtime started with `--auth-token-file`. A token that cannot
    /// be sent as metadata (not visible ASCII) is a local error.
    pub fn with_token(mut self, token: &str) -> Result<Self, CallError> {
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            CallError::local("the token must be visible ASCII characters (it is sent as gRPC metadata)")
        })?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// Adds the client's own metadata (upstream, token) to `request`.
    pub(crate) fn decorate<T>(&self, request: &mut tonic::Request<T>) {
        let metadata = request.metadata_mut();
        if let Some(v) = self.upstream.as_deref().and_then(|u| u.parse().ok()) {
            metadata.insert(contract::UPSTREAM_KEY, v);
        }
        if let Some(v) = &self.authorization {
            metadata.insert("authorization", v.clone());
        }
    }

    /// Starts a call of `func`.
    pub fn call(&self, func: &str) -> CallBuilder {
        CallBuilder::new(self.clone(), func)
    }

    /// Picks up the retained call `call_id` (started with
    /// [`CallBuilder::retain`], from any process, by the same identity):
    /// its heartbeats, then its result and result payload — into the
    /// builder's [`CallBuilder::output`]. A broken stream is reattached
    /// with backoff, as for the call itself; NOT_FOUND when the server
    /// does not hold it.
    pub fn attach(&self, call_id: &str) -> CallBuilder {
        CallBuilder::attach(self.clone(), call_id)
    }

    /// What the server serves: versions, functions, limits.
    pub async fn describe(&self) -> Result<proto::Description, CallError> {
        self.describe_at(None, None).await
    }

    /// `describe`, sent to `upstream` instead of the client's own when
    /// given, within `timeout` when given.
    async fn describe_at(
        &self,
        upstream: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<proto::Description, CallError> {
        let mut grpc = self.grpc.clone();
        let mut request = tonic::Request::new(proto::DescribeRequest {});
        self.decorate(&mut request);
        if let Some(v) = upstream.and_then(|u| u.parse().ok()) {
            request.metadata_mut().insert(contract::UPSTREAM_KEY, v);
        }
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        grpc.describe(request).await.map(tonic::Response::into_inner).map_err(|s| CallError::from_status(&s))
    }

    /// Whether calls to `upstream` may go as one `call` message: asked of
    /// its `describe` once (the call's upstream and token; a failed describe
    /// is a no), then remembered.
    pub(crate) async fn has_one_message(&self, upstream: Option<&str>) -> bool {
        if let Some(&known) = self.one_messages().get(&upstream.map(str::to_owned)) {
            return known;
        }
        let has = self
            .describe_at(upstream, Some(Duration::from_secs(10)))
            .await
            .is_ok_and(|d| d.features.iter().any(|f| f == contract::FEATURE_CALL));
        self.remember_one_message(upstream, has);
        has
    }

    /// Remembers whether `upstream` serves the one-message `call`.
    pub(crate) fn remember_one_message(&self, upstream: Option<&str>, has: bool) {
        self.one_messages().insert(upstream.map(str::to_owned), has);
    }

    fn one_messages(&self) -> std::sync::MutexGuard<'_, HashMap<Option<String>, bool>> {
        // A panic while holding it left a plain map: still usable.
        self.one_message.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The health of `service` (`""` liveness, `ai.AI` readiness): true when SERVING.
    pub async fn health(&self, service: &str) -> Result<bool, CallError> {
        let reply = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest { service: service.to_owned() })
            .await
            .map_err(|s| CallError::from_status(&s))?
            .into_inner();
        Ok(reply.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }
}
