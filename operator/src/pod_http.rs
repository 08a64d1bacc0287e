//! Plain-HTTP GETs from the operator to its pods — a router reloader's
//! `/status`, a runtime's `/metrics` — bounded in time and size, so a slow
//! or hostile pod cannot stall a reconcile or fill the operator's memory;
//! and finding a pod's named port.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether `pod` passes its readiness probe (its `Ready` condition).
pub fn is_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Where `pod` serves its container port named `port`: its pod IP and that
/// port; `None` before it has an IP, or without such a port.
pub fn address(pod: &k8s_openapi::api::core::v1::Pod, port: &str) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    Some(SocketAddr::new(ip, named_port(pod, port)?))
}

/// The port of `pod`'s container port named `name`.
pub fn named_port(pod: &k8s_openapi::api::core::v1::Pod, name: &str) -> Option<u16> {
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))?
        .container_port;
    u16::try_from(port).ok()
}

/// The most a pod's answer may hold.
const MAX_RESPONSE: u64 = 256 << 10;

/// GETs `path` from `addr` within `timeout`; the body of a 200 answer.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    tokio::time::timeout(timeout, fetch(addr, path))
        .await
        .map_err(|_| format!("GET http://{addr}{path}: no answer within {}s", timeout.as_secs_f64()))?
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("GET http://{addr}{path}: {e}");
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(fail)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(fail)?;
    let mut response = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut response).await.map_err(fail)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("GET http://{addr}{path}: no HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(format!("GET http://{addr}{path}: HTTP {status}"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_refusals_and_silence_are_told_apart() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", "HTTP/1.1 404 Not Found\r\n\r\n", ""] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                if answer.is_empty() {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } else {
                    s.write_all(answer.as_bytes()).await.expect("answer");
                }
            }
        });
        assert_eq!(get(addr, "/status", Duration::from_secs(2)).await.as_deref(), Ok("hi"));
        assert!(get(addr, "/status", Duration::from_secs(2)).await.expect_err("404").contains("HTTP 404"));
        let silent = get(addr, "/status", Duration::from_millis(200)).await.expect_err("silence");
        assert!(silent.contains("no answer"), "{silent}");
        server.abort();
    }
}
