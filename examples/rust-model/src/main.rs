//! `word-count`: the aipod runtime serving the word-count model as version
//! `v1`. Every `aipod-runtime` flag works (`--listen`, `--heartbeat`, …).

use aipod_example_rust_model::WordCount;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    aipod_runtime::Runtime::builder().model("v1", WordCount).serve_from_env().await
}
