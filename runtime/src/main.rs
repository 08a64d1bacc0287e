//! The `aipod-runtime` binary: the library's runtime with the models the
//! flags name (by default the built-in demo model).

/// With the `mimalloc` feature, the binary allocates with mimalloc
/// (`bench/memory` measures it against glibc's allocator).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    aipod_runtime::Runtime::builder().serve_from_env().await
}
