//! Accepted connections: plaintext or TLS, closed when no call has been
//! open on them for `--idle-timeout`, and gated so that only gRPC requests
//! reach a handler (anything else is HTTP 415, as the gRPC spec asks).
//!
//! "Idle" counts calls, not bytes: HTTP/2 keepalive pings and a long call's
//! heartbeats both move bytes, but only a connection without an open call
//! is idle. Once the server drains, a connection made before the drain is
//! closed as soon as it carries no call: a proxy that pools connections
//! (nginx's upstream keepalive) then opens a new one — to a pod that is not
//! draining — instead of sending call after call to this one. Connections
//! made during the drain stay, so probes and clients hear UNAVAILABLE. The
//! [`Gate`] layer counts a connection's calls (through the [`ConnInfo`]
//! tonic puts in every request's extensions) from the request to the end
//! of its response body.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{body::Body, codegen::http, transport::server::Connected};

use crate::{engine::drain::Drain, server::coalesce::Coalesce, server::inbound::Inbound, server::tls::Tls};

/// What a request handler learns about its connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The server's address the client connected to.
    pub(crate) local: Option<SocketAddr>,
    /// The client's address.
    pub(crate) remote: Option<SocketAddr>,
    /// The owner key of the client certificate's subject (mutual TLS).
    pub(crate) client: Option<Arc<str>>,
    /// A client certificate was presented that names no one (empty subject,
    /// no URI): such a client cannot retain calls.
    pub(crate) nameless_certificate: bool,
    calls: Arc<Calls>,
}

/// A connection's open calls and when the last one ended.
#[derive(Debug)]
struct Calls {
    open: AtomicUsize,
    last_end: Mutex<Instant>,
    /// Its streams that have not sent their first message yet.
    awaiting: Arc<AtomicUsize>,
}

impl Calls {
    fn new() -> Self {
        Self { open: AtomicUsize::new(0), last_end: Mutex::new(Instant::now()), awaiting: Arc::default() }
    }

    /// When the connection became idle, `None` while a call is open.
    fn idle_since(&self) -> Option<Instant> {
        let last = *self.last_end.lock().unwrap_or_else(PoisonError::into_inner);
        (self.open.load(Ordering::Acquire) == 0).then_some(last)
    }
}

/// Counts a call as open until dropped.
#[derive(Debug)]
struct CallGuard(Arc<Calls>);

impl CallGuard {
    fn new(calls: Arc<Calls>) -> Self {
        calls.open.fetch_add(1, Ordering::AcqRel);
        Self(calls)
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The transport under a connection.
#[derive(Debug)]
pub(crate) enum Transport {
    /// Plain TCP (HTTP/2 cleartext).
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection.
#[derive(Debug)]
pub(crate) struct Conn {
    /// Its transport, writes gathered (`coalesce`).
    io: Coalesce<Transport>,
    info: ConnInfo,
    idle_timeout: Option<Duration>,
    idle_check: Pin<Box<Sleep>>,
    /// Made before the drain: wakes when it starts, and closes once idle.
    drain: Option<(Arc<Drain>, Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>)>,
    /// Its place under `--max-connections`, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// `transport`, closed after `idle_timeout` without an open call, or
    /// as soon as it carries none once `drain` starts; it holds `slot`
    /// under `--max-connections` until it closes.
    pub(crate) fn new(
        transport: Transport,
        idle_timeout: Option<Duration>,
        drain: &Arc<Drain>,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        let tcp = match &transport {
            Transport::Plain(t) => t,
            Transport::Tls(t) => t.get_ref().0,
        };
        let certificate = match &transport {
            Transport::Plain(_) => None,
            Transport::Tls(t) => t.get_ref().1.peer_certificates().and_then(|c| c.first()),
        };
        let client = certificate.and_then(|c| crate::server::tls::subject_owner(c));
        let info = ConnInfo {
            local: tcp.local_addr().ok(),
            remote: tcp.peer_addr().ok(),
            nameless_certificate: certificate.is_some() && client.is_none(),
            client,
            calls: Arc::new(Calls::new()),
        };
        let first = Instant::now() + idle_timeout.unwrap_or(Duration::from_secs(3600));
        let drain = (!drain.is_draining()).then(|| (Arc::clone(drain), Box::pin(drain.started())));
        Self {
            io: Coalesce::new(transport),
            info,
            idle_timeout,
            idle_check: Box::pin(tokio::time::sleep_until(first)),
            drain,
            _slot: slot,
        }
    }

    /// Whether the drain started and this connection, made before it, has
    /// no call left; while one runs, looks again shortly.
    fn drained(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((drain, started)) = &mut self.drain else { return false };
        if started.as_mut().poll(cx).is_pending() || !drain.is_draining() {
            return false;
        }
        // Idle for a moment, not just now: a call's last frames (its result,
        // its trailers) leave after the call counts as ended.
        let next = match self.info.calls.idle_since() {
            Some(since) if since.elapsed() >= DRAIN_IDLE_GRACE => return true,
            Some(since) => since + DRAIN_IDLE_GRACE,
            // A call still runs: its end is looked for every quarter second.
            None => Instant::now() + DRAIN_CHECK,
        };
        self.idle_check.as_mut().reset(next);
        let _ = self.idle_check.as_mut().poll(cx);
        false
    }

    /// Whether the connection has been idle too long; re-arms the timer
    /// otherwise, so the read side is woken when it might be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.idle_timeout else { return false };
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let next = match self.info.calls.idle_since() {
                Some(since) if since.elapsed() >= timeout => return true,
                Some(since) => since + timeout,
                None => Instant::now() + timeout,
            };
            self.idle_check.as_mut().reset(next);
        }
        false
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_pending() && this.expired(cx) {
            tracing::debug!(peer = ?this.info.remote, "closing an idle connection (--idle-timeout)");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection closed")));
        }
        if read.is_pending() && this.drained(cx) {
            tracing::debug!(peer = ?this.info.remote, "closing a connection without calls: the server drains");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, "draining: connection closed")));
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Transport::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(t) => Pin::new(t).poll_write(cx, data),
            Transport::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            Transport::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(t) => t.is_write_vectored(),
            Transport::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(t) => Pin::new(t).poll_flush(cx),
            Transport::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Transport::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The layer in front of every service: HTTP 415 for what is not gRPC,
/// each gRPC request's body metered within the [`Inbound`] bounds, and each
/// counted as an open call of its connection until its response body ends.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gate(Option<Arc<Inbound>>);

impl Gate {
    /// A gate that meters request bodies with `inbound`.
    pub(crate) fn metering(inbound: Arc<Inbound>) -> Self {
        Self(Some(inbound))
    }
}

impl<S> tower_layer::Layer<S> for Gate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated(inner, self.0.clone())
    }
}

/// A service behind the [`Gate`].
#[derive(Debug, Clone)]
pub(crate) struct Gated<S>(S, Option<Arc<Inbound>>);

/// What a gated service's future resolves to.
type GatedFuture<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for Gated<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = GatedFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !is_grpc(request.headers()) {
            return Box::pin(std::future::ready(Ok(unsupported_media_type())));
        }
        let calls = request.extensions().get::<ConnInfo>().map(|c| Arc::clone(&c.calls));
        let request = match (&self.1, &calls) {
            (Some(inbound), Some(calls)) => {
                let (parts, body) = request.into_parts();
                match inbound.meter(parts.uri.path(), body, &calls.awaiting) {
                    Ok((metered, credit)) => {
                        let mut parts = parts;
                        if let Some(credit) = credit {
                            // For the call's decoder, which gives it back.
                            parts.extensions.insert(credit);
                        }
                        http::Request::from_parts(parts, Body::new(metered))
                    }
                    Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
                }
            }
            _ => request,
        };
        let guard = calls.map(CallGuard::new);
        let response = self.0.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                None => response,
                Some(guard) => response.map(|body| Body::new(Counted { body, _guard: guard })),
            })
        })
    }
}

/// Whether a request says it is gRPC (`application/grpc`, `application/grpc+proto`, …).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        let ct = ct.as_bytes().trim_ascii();
        ct.get(..GRPC.len()).is_some_and(|start| start.eq_ignore_ascii_case(GRPC))
            && matches!(ct.get(GRPC.len()), None | Some(b'+' | b';'))
    })
}

/// The answer to a request that is not gRPC.
fn unsupported_media_type() -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(Bytes::from_static(
        b"aipod serves gRPC only: send content-type application/grpc\n",
    ))));
    *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A response body that keeps its call counted until it ends.
struct Counted {
    body: Body,
    _guard: CallGuard,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How long a client gets to send its TLS ClientHello: a connection that
/// says nothing gives its handshake slot back quickly.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client gets to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once; beyond it, accepting waits.
const MAX_HANDSHAKES: usize = 256;

/// TLS handshakes in progress from one client address; beyond it its new
/// connections are closed at once, so one peer cannot take every slot.
const MAX_HANDSHAKES_PER_PEER: usize = 32;

/// How often a connection made before the drain looks whether its last
/// call ended.
const DRAIN_CHECK: Duration = Duration::from_millis(250);

/// How long a connection made before the drain must have been without a
/// call before it is closed: time for the last call's final frames to go.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// While `--max-connections` are open, how often that is logged.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Connections handed to the server that it has not taken yet.
const ACCEPTED_DEPTH: usize = 64;

/// The connections made on `listener` — TLS with `tls` — for the gRPC
/// server, at most `max_connections` open at once; each closed after
/// `idle_timeout` without an open call.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    idle_timeout: Option<Duration>,
    max_connections: usize,
    drain: Arc<Drain>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_DEPTH);
    let open = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::spawn(accept(listener, tls, Timing { idle_timeout, drain }, open, tx));
    ReceiverStream::new(rx)
}

/// What every accepted connection is closed by.
#[derive(Clone)]
struct Timing {
    idle_timeout: Option<Duration>,
    drain: Arc<Drain>,
}

impl Timing {
    /// `transport` as a connection holding `slot`.
    fn conn(&self, transport: Transport, slot: OwnedSemaphorePermit) -> Conn {
        Conn::new(transport, self.idle_timeout, &self.drain, slot)
    }
}

/// Accepts connections; TLS handshakes run in their own tasks, bounded in
/// number and time, so a peer that connects and says nothing holds up no one.
///
/// While `open` has no slot left, nothing is accepted: new connections wait
/// in the kernel's listen backlog (their clients see a slow connect, then
/// their deadline) until a connection closes.
async fn accept(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    timing: Timing,
    open: Arc<Semaphore>,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let peers = Arc::new(Mutex::new(HashMap::new()));
    let mut full_since: Option<Instant> = None;
    loop {
        let slot = match Arc::clone(&open).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_since.is_none_or(|t| t.elapsed() > FULL_WARNING_EVERY) {
                    tracing::warn!("--max-connections connections are open: new ones wait until one closes");
                    full_since = Some(Instant::now());
                }
                let Ok(slot) = Arc::clone(&open).acquire_owned().await else { return };
                slot
            }
        };
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { return };
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        configure(&tcp);
        let Some(tls) = &tls else {
            drop(permit);
            if tx.send(Ok(timing.conn(Transport::Plain(tcp), slot))).await.is_err() {
                return;
            }
            continue;
        };
        let Some(per_peer) = PeerHandshake::enter(&peers, peer.ip()) else {
            handshake_failed(peer, &format!("{MAX_HANDSHAKES_PER_PEER} handshakes from this address are in progress"));
            continue;
        };
        let config = tls.config();
        let (tx, timing) = (tx.clone(), timing.clone());
        tokio::spawn(async move {
            let _permits = (permit, per_peer);
            let lazy = tokio_rustls::LazyConfigAcceptor::new(tokio_rustls::rustls::server::Acceptor::default(), tcp);
            let hello = match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, lazy).await {
                Ok(Ok(start)) => start,
                Ok(Err(e)) => return handshake_failed(peer, &e.to_string()),
                Err(_) => return handshake_failed(peer, "no ClientHello within 2 s"),
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, hello.into_stream(config)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(timing.conn(Transport::Tls(Box::new(stream)), slot))).await;
                }
                Ok(Err(e)) => handshake_failed(peer, &e.to_string()),
                Err(_) => handshake_failed(peer, "no handshake within 10 s"),
            }
        });
    }
}

/// One handshake in progress from an address, counted until dropped.
struct PeerHandshake {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerHandshake {
    /// Counts a handshake from `ip`; `None` when it has as many as allowed.
    fn enter(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut counts = peers.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self { peers: Arc::clone(peers), ip })
    }
}

impl Drop for PeerHandshake {
    fn drop(&mut self) {
        let mut counts = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

fn handshake_failed(peer: SocketAddr, why: &str) {
    tracing::info!(%peer, "TLS handshake failed: {why}");
}

/// The TCP settings of every connection: no Nagle delay, keepalive.
fn configure(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(aipod::contract::TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_pass_and_others_do_not() {
        let headers = |ct: Option<&'static str>| {
            let mut h = http::HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
            }
            h
        };
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC",
            "application/grpc; charset=x",
            " application/grpc ",
        ] {
            assert!(is_grpc(&headers(Some(ok))), "{ok}");
        }
        for bad in ["text/plain", "application/json", "application/grpc-web", "application/grpcx", "application/gr", ""]
        {
            assert!(!is_grpc(&headers(Some(bad))), "{bad}");
        }
        assert!(!is_grpc(&headers(None)));
    }

    #[test]
    fn a_connection_is_idle_only_without_open_calls() {
        let calls = Arc::new(Calls::new());
        assert!(calls.idle_since().is_some());
        let guard = CallGuard::new(Arc::clone(&calls));
        assert!(calls.idle_since().is_none(), "a call is open");
        let before = Instant::now();
        drop(guard);
        assert!(calls.idle_since().is_some_and(|since| since >= before), "idle from the call's end");
    }
}
