//! The `aipod` command-line tool; see `aipod --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    aipod::cli::main().await
}
