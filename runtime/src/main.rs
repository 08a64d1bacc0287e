//! The `aipod-runtime` binary: the library's runtime with the models the
//! flags name (by default the built-in demo model).

/// With the `mimalloc` feature, the binary allocates with mimalloc
/// (`bench/memory` measures it against glibc's allocator).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before the async runtime starts its threads, each of which would
    // otherwise take an allocator arena of its own.
    aipod_runtime::tune_allocator();
    let runtime = tokio::runtime::Runtime::new().expect("the async runtime starts");
    runtime.block_on(aipod_runtime::Runtime::builder().serve_from_env())
}
