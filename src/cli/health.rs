//! `aipod health`: one check of a gRPC health service (or, with `--http`,
//! of an HTTP endpoint such as the operator's `/readyz`), or with `--wait`
//! checks until it answers SERVING — what scripts and `helm test` need.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{TlsArgs, connect_to, fail, print_json};
use crate::client::{CallError, ErrorKind};

/// What `aipod health` checks and how long it keeps checking.
pub(super) struct Check<'a> {
    pub(super) target: &'a str,
    pub(super) service: &'a str,
    pub(super) http: Option<&'a str>,
    pub(super) timeout: Duration,
    pub(super) wait: Option<Duration>,
    pub(super) tls: &'a TlsArgs,
}

/// The pause between two checks under `--wait`.
const RETRY: Duration = Duration::from_secs(1);

/// Runs the check, printing `{"service", "status"}` and exiting 0 when
/// SERVING; under `--wait`, every answer short of SERVING (no connection,
/// NOT_SERVING, no answer) is asked again until the wait ends.
pub(super) async fn run(check: Check<'_>, verbose: bool) -> u8 {
    let deadline = check.wait.map(|w| Instant::now() + w);
    let name = check.http.unwrap_or(check.service);
    loop {
        let answer = once(&check).await;
        let more = deadline.is_some_and(|d| Instant::now() + RETRY < d);
        match answer {
            Ok(true) => return print_json(&serde_json::json!({ "service": name, "status": "SERVING" })),
            Ok(false) if !more => {
                print_json(&serde_json::json!({ "service": name, "status": "NOT_SERVING" }));
                return 8;
            }
            Err(e) if !more => return fail(&e, verbose),
            Err(e) => tracing::debug!(error = %e, "not serving yet"),
            Ok(false) => tracing::debug!("NOT_SERVING yet"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One check, bounded by `--timeout`: `Ok(serving)` or why there was no answer.
async fn once(check: &Check<'_>) -> Result<bool, CallError> {
    let answer = async {
        match check.http {
            Some(path) => http_ok(check.target, path).await,
            None => connect_to(check.target, None, check.tls).await?.health(check.service).await,
        }
    };
    let answer = tokio::time::timeout(check.timeout, answer).await.unwrap_or_else(|_| {
        Err(CallError::new(
            ErrorKind::Connect,
            tonic::Code::DeadlineExceeded,
            format!("no answer within {} (--timeout)", crate::duration::format(check.timeout)),
        ))
    });
    // Which server did not answer, in every message.
    answer.map_err(|mut e| {
        e.target.get_or_insert_with(|| check.target.to_owned());
        e
    })
}

/// `GET path` on an `http://host:port` target over HTTP/1.1: 200 is
/// serving, any other status is not; no connection is an error.
async fn http_ok(target: &str, path: &str) -> Result<bool, CallError> {
    let uri: tonic::codegen::http::Uri =
        target.parse().map_err(|e| CallError::local(format!("--http: target {target:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(CallError::local(format!("--http checks plain http:// targets, not {target:?}")));
    }
    let host = uri.host().ok_or_else(|| CallError::local(format!("--http: target {target:?} has no host")))?;
    let port = uri.port_u16().unwrap_or(80);
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CallError::local(format!("--http {path:?}: expected a path such as /readyz")));
    }
    let unreachable = |e: std::io::Error| {
        let mut err = CallError::new(ErrorKind::Connect, tonic::Code::Unavailable, e.to_string());
        err.target = Some(target.to_owned());
        err
    };
    let mut stream = tokio::net::TcpStream::connect((host, port)).await.map_err(unreachable)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: aipod\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(unreachable)?;
    // The status line is all that counts; a health body is short.
    let mut head = Vec::with_capacity(256);
    stream.take(4096).read_to_end(&mut head).await.map_err(unreachable)?;
    status_is_ok(&head).ok_or_else(|| {
        CallError::new(ErrorKind::Protocol, tonic::Code::Unknown, format!("{target}{path} did not answer HTTP/1.1"))
    })
}

/// Whether an HTTP/1.x response starts with status 200; `None` when it is
/// not an HTTP response at all.
fn status_is_ok(response: &[u8]) -> Option<bool> {
    let line = response.split(|&b| b == b'\n').next()?;
    let mut parts = std::str::from_utf8(line).ok()?.split_whitespace();
    let version = parts.next()?;
    let code: u16 = parts.next()?.parse().ok()?;
    version.starts_with("HTTP/1.").then_some(code == 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_200_status_line_is_serving() {
        assert_eq!(status_is_ok(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready"), Some(true));
        assert_eq!(status_is_ok(b"HTTP/1.1 503 Service Unavailable\r\n\r\nstarting"), Some(false));
        assert_eq!(status_is_ok(b"HTTP/1.0 204 No Content\r\n\r\n"), Some(false));
        assert_eq!(status_is_ok(b"\x00\x00\x12\x04"), None, "an HTTP/2 frame is no answer");
        assert_eq!(status_is_ok(b""), None);
    }
}
