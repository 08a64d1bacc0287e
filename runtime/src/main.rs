//! The `aipod-runtime` binary: the library's runtime with the models the
//! flags name (by default the built-in demo model).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    aipod_runtime::Runtime::builder().serve_from_env().await
}
