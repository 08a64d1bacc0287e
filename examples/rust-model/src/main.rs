//! `word-count`: the aipod runtime serving the word-count model as version
//! `v1`. Every `aipod-runtime` flag works (`--listen`, `--heartbeat`, …).

use aipod_example_rust_model::WordCount;

fn main() -> std::process::ExitCode {
    // Before the async runtime starts its threads (see `tune_allocator`).
    aipod_runtime::tune_allocator();
    let runtime = tokio::runtime::Runtime::new().expect("the async runtime starts");
    runtime.block_on(aipod_runtime::Runtime::builder().model("v1", WordCount).serve_from_env())
}
