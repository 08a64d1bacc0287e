//! `exec:` models with real Python workers (the SDK from `sdk/python` and
//! the test model in `tests/workers/model.py`): results, discovery,
//! progress, cancellation, crashes and restarts, concurrency, drain and
//! start-up failures.

use std::{path::Path, time::Duration};

use aipod::proto::{self, Encoding};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    Mixed, Process, TestServer, call, client, collect, header, health, open, raw, sha256_hex, wait_for_phase,
    wait_for_readiness,
};

const READY_WITHIN: Duration = Duration::from_secs(30);

/// `exec:` spec of the test model with extra flags.
fn test_model(flags: &str) -> String {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/model.py");
    format!("exec:python3 {} {flags}", model.display())
}

/// An in-process runtime serving the test model, ready.
async fn serve(extra: &[&str]) -> TestServer {
    let spec = test_model("");
    let mut args = vec!["--model", &spec, "--heartbeat", "100ms"];
    args.extend_from_slice(extra);
    let server = TestServer::start(&args).await;
    wait_for_readiness(&server.addr, ServingStatus::Serving, READY_WITHIN).await;
    server
}

async fn pid(c: &mut aipod::proto::ai_client::AiClient<tonic::transport::Channel>) -> u64 {
    let out = raw(c, Some("pid"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    out.ok()["pid"].as_u64().expect("pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_exec_returns_the_workers_result_and_payload() {
    let server = serve(&[]).await;
    let mut c = server.client().await;

    let description = c.describe(proto::DescribeRequest::default()).await.expect("describe").into_inner();
    let v1 = &description.versions[0];
    assert_eq!(
        v1.functions,
        [
            "big_result",
            "counted",
            "crash",
            "double",
            "echo",
            "escape",
            "late_progress",
            "pid",
            "slow",
            "slow_echo",
            "stubborn",
            "traced"
        ],
        "functions come from ready"
    );
    assert!(v1.ready && v1.spec.contains("exec:python3"));

    let size = 3 << 20;
    let out = call(&mut c, "echo", json!({"label": "x"}), Mixed::new(size), Some(size)).await;
    assert_eq!(out.ok()["kwargs"], json!({"label": "x"}), "the model's print() did not break the protocol");
    assert_eq!((out.json["size"].as_u64(), out.json["input_size"].as_u64()), (Some(size), Some(size)));
    assert_eq!(out.data_len, size);
    assert_eq!(out.data_sha256, Some(sha256_hex(Mixed::new(size))), "result payload = the input");

    let out = raw(&mut c, Some("double"), vec![header("", json!({"x": 21}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["double"], 42, "async def functions work");
    let out = raw(&mut c, Some("nope"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), tonic::Code::Unimplemented);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_heartbeats_and_escaping_results_are_rejected() {
    let server = serve(&[]).await;
    let mut c = server.client().await;
    let out = raw(&mut c, Some("slow"), vec![header("", json!({"seconds": 1.0}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["slept"], 1.0);
    let running: Vec<_> = out.beats.iter().filter(|b| b.phase == proto::Phase::Running as i32).collect();
    assert!(running.len() >= 5, "{} running beats", running.len());
    assert!(running.iter().any(|b| b.progress.is_some_and(|p| p > 0.3)), "{running:?}");
    assert!(running.iter().any(|b| b.message.starts_with("step ")), "{running:?}");

    let out = raw(&mut c, Some("escape"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), tonic::Code::Internal);
    assert!(out.error.as_ref().expect("error").message().contains("outside the call's output directory"));
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_call_in_the_worker() {
    let server = serve(&[]).await;
    let mut c = server.client().await;
    let marker = tempfile::tempdir().expect("dir");
    let marker = marker.path().join("cancelled");
    let (tx, response) =
        open(&mut c, Some("slow"), vec![header("", json!({"seconds": 60, "marker": marker}), Some(0), Encoding::Zstd)])
            .await;
    drop(tx);
    let mut replies = response.expect("accepted").into_inner();
    wait_for_phase(&mut replies, proto::Phase::Running).await;
    drop(replies);
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(tokio::time::Instant::now() < deadline, "ctx.cancelled never became true");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The worker answered the cancel, so it is free for the next call.
    let mut c = server.client().await;
    let out = raw(&mut c, Some("slow"), vec![header("", json!({"seconds": 0.1}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["slept"], 0.1);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_call_fails_it_with_its_stderr_and_is_restarted() {
    let server = serve(&[]).await;
    let mut c = server.client().await;
    let first = pid(&mut c).await;
    let (tx, response) =
        open(&mut c, Some("slow"), vec![header("", json!({"seconds": 60}), Some(0), Encoding::Zstd)]).await;
    drop(tx);
    let mut replies = response.expect("accepted").into_inner();
    wait_for_phase(&mut replies, proto::Phase::Running).await;
    let killed = std::process::Command::new("kill").args(["-9", &first.to_string()]).status().expect("kill");
    assert!(killed.success());
    let out = collect(Ok(tonic::Response::new(replies))).await;
    assert_eq!(out.code(), tonic::Code::Internal, "{:?}", out.error);
    let message = out.error.as_ref().expect("error").message().to_owned();
    assert!(message.contains("SIGKILL") && message.contains("its stderr is in the runtime's log"), "{message}");
    assert!(!message.contains("slow started for 60"), "the stderr tail stays in the log: {message}");

    // While it restarts, readiness says so and calls are refused as retryable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let second = loop {
        let out = raw(&mut c, Some("pid"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
        match out.code() {
            tonic::Code::Ok => break out.json["pid"].as_u64().expect("pid"),
            tonic::Code::Unavailable => {
                assert!(tokio::time::Instant::now() < deadline, "the worker was not restarted");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}: {:?}", out.error),
        }
    };
    assert_ne!(first, second, "a new worker process serves the next call");

    // A worker that kills itself is reported the same way.
    let out = raw(&mut c, Some("crash"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), tonic::Code::Internal);
    let message = out.error.as_ref().expect("error").message();
    assert!(message.contains("SIGKILL") && !message.contains("about to crash"), "a summary, not the tail: {message}");
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_serve_two_calls_at_once_while_a_third_queues() {
    let server = serve(&["--workers", "2"]).await;
    let mut c = server.client().await;
    let mut running = Vec::new();
    for _ in 0..2 {
        let (tx, response) =
            open(&mut c, Some("slow"), vec![header("", json!({"seconds": 1.5}), Some(0), Encoding::Zstd)]).await;
        drop(tx);
        let mut replies = response.expect("accepted").into_inner();
        wait_for_phase(&mut replies, proto::Phase::Running).await;
        running.push(tokio::spawn(collect(Ok(tonic::Response::new(replies)))));
    }
    let (tx, response) =
        open(&mut c, Some("slow"), vec![header("", json!({"seconds": 0.1}), Some(0), Encoding::Zstd)]).await;
    drop(tx);
    let third = collect(response).await;
    assert_eq!(third.ok()["slept"], 0.1);
    let queued = third.beats.iter().filter(|b| b.phase == proto::Phase::Queued as i32).count();
    assert!(queued >= 3, "the third call waited for a worker ({queued} queued beats)");
    let mut pids = Vec::new();
    for call in running {
        let out = call.await.expect("join");
        pids.push(out.ok()["pid"].as_u64().expect("pid"));
    }
    assert_ne!(pids[0], pids[1], "two worker processes ran them");
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_every_worker_and_a_worker_that_never_gets_ready_fails_startup() {
    // Workers that take a second to "load": NOT_SERVING, then SERVING.
    let spec = test_model("--init-delay 1");
    let server = TestServer::start(&["--model", &spec, "--workers", "2"]).await;
    assert_eq!(health(&server.addr, "ai.AI").await, ServingStatus::NotServing);
    assert_eq!(health(&server.addr, "").await, ServingStatus::Serving, "alive while loading");
    let mut c = server.client().await;
    let early = raw(&mut c, Some("pid"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(early.code(), tonic::Code::Unavailable, "calls before ready are refused: {:?}", early.error);
    wait_for_readiness(&server.addr, ServingStatus::Serving, READY_WITHIN).await;
    server.stop().await.expect("clean stop");

    let never =
        r#"exec:python3 -c "import sys, time; print('loading weights', file=sys.stderr, flush=True); time.sleep(60)""#;
    let server = TestServer::start(&["--model", never, "--worker-start-timeout", "1s"]).await;
    let err = tokio::time::timeout(Duration::from_secs(20), server.join())
        .await
        .expect("start-up failure ends the runtime")
        .expect_err("start-up must fail")
        .to_string();
    assert!(err.contains("did not send ready within 1s"), "{err}");
    assert!(err.contains("loading weights"), "stderr tail: {err}");

    let server = TestServer::start(&["--model", "exec:python3 -c 'raise SystemExit(3)'"]).await;
    let err = server.join().await.expect_err("start-up must fail").to_string();
    assert!(err.contains("exited before it was ready") && err.contains("status 3"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_the_running_call_finish_then_shuts_the_workers_down() {
    let marker_dir = tempfile::tempdir().expect("dir");
    let marker = marker_dir.path().join("closed");
    let spec = test_model(&format!("--shutdown-marker {}", marker.display()));
    let mut process = Process::start(&["--model", &spec, "--heartbeat", "100ms"]);
    wait_for_readiness(&process.addr, ServingStatus::Serving, READY_WITHIN).await;
    let mut c = client(&process.addr).await;
    let (tx, response) =
        open(&mut c, Some("slow"), vec![header("", json!({"seconds": 1.5}), Some(0), Encoding::Zstd)]).await;
    drop(tx);
    let mut replies = response.expect("accepted").into_inner();
    wait_for_phase(&mut replies, proto::Phase::Running).await;
    process.signal("TERM");
    let out = collect(Ok(tonic::Response::new(replies))).await;
    assert_eq!(out.ok()["slept"], 1.5, "the running call finished during drain");
    assert_eq!(process.wait_exit(Duration::from_secs(15)), Some(0));
    assert_eq!(std::fs::read_to_string(&marker).ok().as_deref(), Some("closed"), "the worker got shutdown");
    let log = process.log.lock().expect("log").join("\n");
    assert!(log.contains("slow started for 1.5s") && log.contains("\"worker\":0"), "stderr is logged, tagged: {log}");
    assert!(log.contains("worker exited after shutdown"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_still_busy_after_the_drain_timeout_is_killed_after_the_grace() {
    let spec = test_model("");
    let mut process =
        Process::start(&["--model", &spec, "--drain-timeout", "1s", "--worker-grace", "1s", "--heartbeat", "100ms"]);
    wait_for_readiness(&process.addr, ServingStatus::Serving, READY_WITHIN).await;
    let mut c = client(&process.addr).await;
    let (tx, response) =
        open(&mut c, Some("stubborn"), vec![header("", json!({"seconds": 120}), Some(0), Encoding::Zstd)]).await;
    drop(tx);
    let mut replies = response.expect("accepted").into_inner();
    wait_for_phase(&mut replies, proto::Phase::Running).await;
    let started = std::time::Instant::now();
    process.signal("TERM");
    // Drain timeout 1 s, then cancel, then the kill after a 1 s grace.
    assert_eq!(process.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped in {:?}, not after the 120 s call",
        started.elapsed()
    );
    let log = process.log.lock().expect("log").join("\n");
    assert!(log.contains("did not stop within 1s of being cancelled and was killed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_gets_ready_stops_the_binary_with_a_clear_message() {
    let never = "exec:sleep 60";
    let mut process = Process::start(&["--model", never, "--worker-start-timeout", "500ms"]);
    assert_eq!(process.wait_exit(Duration::from_secs(15)), Some(1));
    let log = process.log.lock().expect("log").join("\n");
    assert!(log.contains("did not send ready within 500ms"), "{log}");
    assert!(log.contains("--worker-start-timeout"), "the message says what to change: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_model_trains_and_predicts_end_to_end() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-model");
    let data = tempfile::tempdir().expect("dir");
    let made = std::process::Command::new("python3")
        .arg(example.join("make_data.py"))
        .arg(data.path())
        .status()
        .expect("run make_data.py");
    assert!(made.success());
    let weights = data.path().join("weights.json");
    let spec = format!("exec:python3 {} --weights {}", example.join("model.py").display(), weights.display());
    let server = TestServer::start(&["--model", &spec, "--workers", "2", "--heartbeat", "100ms"]).await;
    wait_for_readiness(&server.addr, ServingStatus::Serving, READY_WITHIN).await;
    let mut c = server.client().await;

    let before = raw(&mut c, Some("predict"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(before.code(), tonic::Code::FailedPrecondition, "no weights yet: {:?}", before.error);
    let message = before.error.as_ref().map(|s| s.message().to_owned()).unwrap_or_default();
    assert!(!message.contains("start the worker with --weights"), "it was started with --weights: {message}");
    assert!(message.contains("call train first"), "{message}");

    let train = std::fs::File::open(data.path().join("train.csv")).expect("train.csv");
    let size = train.metadata().expect("stat").len();
    let out = call(&mut c, "train", json!({"epochs": 4}), train, Some(size)).await;
    let trained = out.ok().clone();
    assert_eq!(trained["labels"], json!(["billing", "shipping", "technical"]));
    assert!(trained["heldout_accuracy"].as_f64().expect("accuracy") > 0.8, "{trained}");
    assert!(out.data_len > 0, "the trained model file comes back as the result payload");
    assert!(weights.exists());

    // Both workers predict from the saved weights; compare with the labels.
    let texts = std::fs::File::open(data.path().join("texts.txt")).expect("texts");
    let size = texts.metadata().expect("stat").len();
    let truth: Vec<String> = std::fs::read_to_string(data.path().join("test.csv"))
        .expect("test.csv")
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().expect("label").to_owned())
        .collect();
    let out = call(&mut c, "predict", json!({}), texts, Some(size)).await;
    assert_eq!(out.ok()["count"].as_u64(), Some(truth.len() as u64));
    let predicted = out.json["labels"].as_object().expect("label counts");
    for label in ["billing", "shipping", "technical"] {
        let want = truth.iter().filter(|t| *t == label).count() as f64;
        let got = predicted.get(label).and_then(serde_json::Value::as_u64).unwrap_or(0) as f64;
        assert!((got - want).abs() <= 0.2 * want, "{label}: predicted {got}, truly {want}");
    }
    assert!(out.data_len > 0, "predictions.csv comes back");

    let log = raw(&mut c, Some("log"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
    let epochs = log.ok()["log"].as_array().expect("log entries");
    assert_eq!(epochs.len(), 4);
    assert_eq!(epochs[3]["epoch"], 4);

    let bad = call(&mut c, "train", json!({}), std::io::Cursor::new(b"no,header\n".to_vec()), Some(10)).await;
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{:?}", bad.error);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_prints_at_import_in_its_constructor_and_from_c_still_serves() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/noisy.py");
    let spec = format!("exec:python3 {}", model.display());
    let server = TestServer::start(&["--model", &spec, "--heartbeat", "100ms"]).await;
    wait_for_readiness(&server.addr, ServingStatus::Serving, READY_WITHIN).await;
    let mut c = server.client().await;
    let out = raw(&mut c, Some("shout"), vec![header("", json!({"word": "ok"}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["word"], "OK", "{:?}", out.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_a_cancel_is_replaced_without_crash_backoff() {
    let server = serve(&["--worker-grace", "200ms"]).await;
    let mut c = server.client().await;
    // A client that abandons calls to a function that ignores cancel, again
    // and again: each time the worker is killed after the grace.
    for round in 0..4 {
        let (tx, response) =
            open(&mut c, Some("stubborn"), vec![header("", json!({"seconds": 60}), Some(0), Encoding::Zstd)]).await;
        drop(tx);
        let mut replies = response.expect("accepted").into_inner();
        wait_for_phase(&mut replies, proto::Phase::Running).await;
        drop(replies);
        let abandoned = tokio::time::Instant::now();
        // Crash backoff would wait 1, 2, 4, 8 s: a replacement comes at once.
        loop {
            let out = raw(&mut c, Some("pid"), vec![header("", json!({}), Some(0), Encoding::Zstd)]).await;
            match out.code() {
                tonic::Code::Ok => break,
                tonic::Code::Unavailable => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("round {round}: unexpected {other:?}: {:?}", out.error),
            }
            assert!(abandoned.elapsed() < Duration::from_secs(3), "round {round}: no worker within 3 s");
        }
    }
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_calls_late_progress_does_not_break_the_next_call() {
    let server = serve(&[]).await;
    let mut c = server.client().await;
    let first = pid(&mut c).await;
    let out =
        raw(&mut c, Some("late_progress"), vec![header("", json!({"after": 0.3}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["returned"], true);
    // The late progress arrives while this call runs, on the same worker.
    let out = raw(&mut c, Some("slow"), vec![header("", json!({"seconds": 1.0}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["slept"], 1.0, "{:?}", out.error);
    assert_eq!(out.ok()["pid"].as_u64(), Some(first), "the same worker, not killed");
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_json_over_the_limit_fails_with_the_limit_and_the_worker_serves_on() {
    let server = serve(&[]).await;
    let mut c = server.client().await;
    let first = pid(&mut c).await;
    // 9 MiB: more than a reply may carry (8 MiB less 64 KiB), less than the
    // 16 MiB a worker line could once hold.
    let out =
        raw(&mut c, Some("big_result"), vec![header("", json!({"size": 9 << 20}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.code(), tonic::Code::ResourceExhausted, "{:?}", out.error);
    let message = out.error.expect("status").message().to_owned();
    assert!(message.contains("at most 8323072 bytes") && message.contains("result payload"), "{message}");
    // Just under the limit goes through, on the same worker.
    let out =
        raw(&mut c, Some("big_result"), vec![header("", json!({"size": 4 << 20}), Some(0), Encoding::Zstd)]).await;
    assert_eq!(out.ok()["s"].as_str().map(str::len), Some(4 << 20));
    assert_eq!(pid(&mut c).await, first, "the worker was not restarted");
    server.stop().await.expect("clean stop");
}
