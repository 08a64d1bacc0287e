//! The word-count model served by the runtime library on a real loopback
//! socket, called with the aipod client.

use aipod::client::{Output, RetryPolicy};
use aipod_example_rust_model::WordCount;
use aipod_runtime::{Config, Runtime};
use clap::Parser;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_over_a_real_socket_with_a_result_file() {
    let spool = tempfile::tempdir().expect("spool");
    let config =
        Config::try_parse_from(["word-count", "--spool-dir", spool.path().to_str().expect("utf-8")]).expect("config");
    let listener = aipod_runtime::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        Runtime::builder()
            .model("v1", WordCount)
            .serve(&config, listener, async {
                let _ = stopped.await;
            })
            .await
    });

    let client = aipod::Client::connect(&format!("http://{addr}")).await.expect("client");
    let described = client.describe().await.expect("describe");
    assert_eq!(described.versions.len(), 1, "a registered model replaces the demo default");
    assert_eq!(described.versions[0].functions, ["count"]);
    assert_eq!(described.versions[0].spec, "rust:aipod_example_rust_model::WordCount");

    // Big enough to be decoded on the bridge's thread and read in pieces.
    let text = "the cat sat on the mat\nThe END\n".repeat(100_000);
    let out_dir = tempfile::tempdir().expect("out");
    let csv = out_dir.path().join("counts.csv");
    let result = client
        .call("count")
        .bytes(text.clone().into_bytes())
        .kwarg("top", 2)
        .kwarg("csv", true)
        .output(Output::File(csv.clone()))
        .send()
        .await
        .expect("count");
    let value: Value = result.json().expect("json");
    assert_eq!(value["bytes"], text.len() as u64);
    assert_eq!((value["lines"].as_u64(), value["words"].as_u64()), (Some(200_000), Some(800_000)));
    assert_eq!(value["distinct"], 6);
    assert_eq!(value["top"], json!([["the", 300_000], ["cat", 100_000]]));
    let counts = std::fs::read_to_string(&csv).expect("counts.csv");
    assert!(counts.starts_with("word,count\nthe,300000\n"), "{counts}");
    assert_eq!(counts.lines().count(), 7);

    let err = client.call("count").kwarg("top", 0).retry(RetryPolicy::none()).send().await.expect_err("bad kwarg");
    assert_eq!(format!("{:?}", err.code), "InvalidArgument", "{err}");
    let err = client.call("nope").retry(RetryPolicy::none()).send().await.expect_err("unknown");
    assert!(err.message.contains("count"), "the error names what is served: {err}");

    let _ = stop.send(());
    server.await.expect("server task").expect("served and drained");
}
