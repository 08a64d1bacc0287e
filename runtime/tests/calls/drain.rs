//! Drain of the real binary: SIGTERM during three long calls.

use std::time::Duration;

use aipod::proto::{self, Encoding};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{Process, client, collect, header, health, open, raw, running_sleep};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_calls_finishes_running_ones_and_exits_zero() {
    let mut process = Process::start(&["--heartbeat", "100ms", "--drain-timeout", "30s"]);
    let addr = process.addr.clone();
    let mut c = client(&addr).await;
    assert_eq!(health(&addr, "").await, ServingStatus::Serving);
    assert_eq!(health(&addr, "ai.AI").await, ServingStatus::Serving);

    let mut running = Vec::new();
    for _ in 0..3 {
        let (tx, response) =
            open(&mut c, Some("sleep"), vec![header("", json!({"seconds": 2}), Some(0), Encoding::Zstd)]).await;
        drop(tx);
        let mut replies = response.expect("accepted").into_inner();
        crate::support::wait_for_phase(&mut replies, proto::Phase::Running).await;
        running.push(tokio::spawn(collect(Ok(tonic::Response::new(replies)))));
    }

    process.signal("TERM");
    // Readiness turns NOT_SERVING; liveness stays SERVING.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while health(&addr, "ai.AI").await != ServingStatus::NotServing {
        assert!(tokio::time::Instant::now() < deadline, "readiness never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&addr, "").await, ServingStatus::Serving);
    let refused = raw(&mut c, Some("echo"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{:?}", refused.error);
    let retryable =
        refused.error.as_ref().and_then(|s| s.metadata().get("x-aipod-retryable")).and_then(|v| v.to_str().ok());
    assert_eq!(retryable, Some("true"), "a draining server's refusal may be retried elsewhere");

    for call in running {
        let out = call.await.expect("join");
        assert_eq!(out.ok()["slept"], 2.0);
        assert!(out.beats.len() > 5, "heartbeats kept flowing during drain");
    }
    assert_eq!(process.wait_exit(Duration::from_secs(15)), Some(0));
    assert!(crate::support::spool_entries(&process.spool.path().to_owned()).is_empty());
    let log = process.log.lock().expect("log").join("\n");
    assert!(log.contains("drained: every call finished"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let mut process = Process::start(&["--drain-timeout", "60s"]);
    let mut c = client(&process.addr).await;
    let _replies = running_sleep(&mut c, 60.0).await;
    process.signal("TERM");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !process.log.lock().expect("log").iter().any(|l| l.contains("draining")) {
        assert!(tokio::time::Instant::now() < deadline, "no drain started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    process.signal("INT");
    assert_eq!(process.wait_exit(Duration::from_secs(5)), Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_abandons_calls_and_still_exits_zero() {
    let mut process = Process::start(&["--drain-timeout", "500ms"]);
    let mut c = client(&process.addr).await;
    let replies = running_sleep(&mut c, 60.0).await;
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(10)), Some(0));
    let out = collect(Ok(tonic::Response::new(replies))).await;
    assert_eq!(out.code(), tonic::Code::Unavailable, "the abandoned call is told why: {:?}", out.error);
    assert!(out.error.expect("status").message().contains("shut down"));
    let log = process.log.lock().expect("log").join("\n");
    assert!(log.contains("drain timeout"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_longer_than_max_call_duration_ends_with_deadline_exceeded_naming_the_limit() {
    // A drain as long as --max-call-duration is then always enough: the
    // call is ended by the limit, not cut by the end of the drain.
    let mut process = Process::start(&["--max-call-duration", "1500ms", "--drain-timeout", "1500ms"]);
    let (mut c, mut other) = (client(&process.addr).await, client(&process.addr).await);
    let started = std::time::Instant::now();
    let long = raw(&mut c, Some("sleep"), vec![header("", json!({"seconds": 30}), Some(0), Encoding::Zstd)]);
    let short = raw(&mut other, Some("sleep"), vec![header("", json!({"seconds": 0.2}), Some(0), Encoding::Zstd)]);
    let (long, short) = tokio::join!(long, short);
    assert_eq!(short.ok()["slept"], 0.2, "a call within the limit is untouched");
    assert_eq!(long.code(), tonic::Code::DeadlineExceeded, "{:?}", long.error);
    let message = long.error.expect("status").message().to_owned();
    assert!(message.contains("--max-call-duration") && message.contains("1500ms"), "{message}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(10), "ended after {took:?}");
    process.signal("TERM");
    assert_eq!(process.wait_exit(Duration::from_secs(15)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_connections_made_before_it_once_they_carry_no_call() {
    // A proxy's pooled connection (nginx's upstream keepalive) must not
    // keep sending new calls to a draining server: closed, it makes the
    // proxy open a new one, to a replica that is not draining.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut process = Process::start(&["--drain-timeout", "30s"]);
    let mut pooled = tokio::net::TcpStream::connect(&process.addr).await.expect("connect");
    pooled.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.expect("preface");
    let mut buf = [0u8; 1024];
    assert!(pooled.read(&mut buf).await.expect("settings") > 0, "the server answers the preface");
    let mut c = client(&process.addr).await;
    let _running = running_sleep(&mut c, 4.0).await;
    process.signal("TERM");
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match pooled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection made before the drain is still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    // The connection carrying the running call stays until it ends.
    assert_eq!(process.wait_exit(Duration::from_secs(15)), Some(0));
}
