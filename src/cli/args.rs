//! The `aipod` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};

use crate::{contract, duration};

/// Call ML models served by aipod over gRPC.
#[derive(Debug, Parser)]
#[command(name = "aipod", version, after_help = super::exit::TABLE)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
    /// More detail on errors and retries.
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Call a model function, streaming a payload and printing the result JSON.
    #[command(after_help = super::exit::TABLE)]
    Call(CallArgs),
    /// Show the server's model versions, functions and limits.
    Describe {
        /// The server or router, e.g. http://127.0.0.1:50051.
        #[arg(env = "AIPOD_TARGET", default_value = contract::DEFAULT_TARGET)]
        target: String,
        /// The `x-upstream` to ask, through a router.
        #[arg(long)]
        upstream: Option<String>,
        /// Bearer token for a server started with --auth-token-file
        /// (prefer the environment variable: arguments show in `ps`).
        #[arg(long, env = "AIPOD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// TLS settings for https:// targets.
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Pick up a retained call (`aipod call --retain …`) from any shell:
    /// its progress, then its result JSON and result payload.
    #[command(after_help = super::exit::TABLE)]
    Attach(AttachArgs),
    /// Check a health service; exits 0 when SERVING, 8 otherwise.
    #[command(after_help = super::exit::TABLE)]
    Health {
        /// The server or router.
        #[arg(env = "AIPOD_TARGET", default_value = contract::DEFAULT_TARGET)]
        target: String,
        /// `""` for liveness, `ai.AI` for readiness.
        #[arg(long, default_value = contract::READINESS_SERVICE)]
        service: String,
        /// Check an HTTP endpoint of the target instead, e.g. `/readyz` of
        /// the operator's admin port: status 200 is SERVING.
        #[arg(long, value_name = "PATH", conflicts_with = "service")]
        http: Option<String>,
        /// Give up when no answer comes within this long (exit 3).
        #[arg(long, default_value = "10s", value_parser = duration::parse)]
        timeout: std::time::Duration,
        /// Keep checking, once a second, until SERVING or this long has
        /// passed, e.g. 2m: for scripts and `helm test` waiting on a rollout.
        #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
        wait: Option<std::time::Duration>,
        /// TLS settings for https:// targets.
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Print the CLI reference (docs/cli.md) as Markdown.
    #[command(hide = true)]
    CliReference,
}

/// TLS for `https://` targets.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// CA certificate(s) to trust for an https:// target (PEM; default: the
    /// system's roots).
    #[arg(long, env = "AIPOD_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate for servers that require mutual TLS (PEM; with --key).
    #[arg(long, env = "AIPOD_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "AIPOD_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// The client's TLS options.
    pub fn options(&self) -> Result<crate::client::TlsOptions, crate::client::CallError> {
        crate::client::TlsOptions::from_files(self.ca.as_deref(), self.cert.as_deref(), self.key.as_deref())
    }
}

/// Where a call goes and as whom: shared by `call` and `attach`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server or router, e.g. http://127.0.0.1:50051.
    #[arg(env = "AIPOD_TARGET", default_value = contract::DEFAULT_TARGET)]
    pub target: String,
    /// The `x-upstream` routers use to pick the backend.
    #[arg(long)]
    pub upstream: Option<String>,
    /// Bearer token for a server started with --auth-token-file (prefer
    /// the environment variable: arguments show in `ps`).
    #[arg(long, env = "AIPOD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS settings for https:// targets.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `aipod call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The server, its metadata and credentials.
    #[command(flatten)]
    pub server: ServerArgs,
    /// The function to call.
    #[arg(long = "func", short = 'f')]
    pub func: String,
    /// The model version (default: the server's default).
    #[arg(long)]
    pub version: Option<String>,
    /// The payload file, or `-` for stdin (stdin is never retried).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A keyword argument, `key=value`; the value is JSON when it parses as
    /// JSON, else a string. Repeatable.
    #[arg(long = "kw", value_name = "KEY=VALUE")]
    pub kw: Vec<String>,
    /// All kwargs as a JSON object, or `@file.json`.
    #[arg(long, value_name = "JSON|@FILE")]
    pub kwargs_json: Option<String>,
    /// Where to save the result payload.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Payload compression: `auto` picks the zstd level that moves the most
    /// payload per second on this link as it goes (small payloads go
    /// uncompressed); or a fixed zstd level from -7 (fastest) to 22
    /// (smallest); `none` for none.
    #[arg(long, default_value = "auto", value_name = "auto|none|LEVEL", allow_hyphen_values = true)]
    pub zstd_level: crate::codec::Compression,
    /// Send the payload uncompressed.
    #[arg(long, conflicts_with = "zstd_level")]
    pub no_compress: bool,
    /// Give up after this long, e.g. 30s, 2h.
    #[arg(long, value_parser = duration::parse)]
    pub timeout: Option<std::time::Duration>,
    /// The call may be retried even after the model started.
    #[arg(long)]
    pub idempotent: bool,
    /// Attempts in all for refused calls (1 = no retry).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub attempts: u32,
    /// A call id for correlating logs (a retained call's key: at least 16
    /// unguessable characters; one is made when not given).
    #[arg(long)]
    pub call_id: Option<String>,
    /// Retain the call this long if the connection breaks, e.g. 1h: the
    /// model keeps running, this command reattaches (or resumes the upload)
    /// by itself, and `aipod attach CALL_ID` picks the call up from any
    /// shell. The call id is printed on stderr at the start.
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    pub retain: Option<std::time::Duration>,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `aipod attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The call id `aipod call --retain` printed.
    pub call_id: String,
    /// The server the call was started on (or the router in front of it),
    /// and the token that started it.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Where to save the result payload.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Give up reattaching after a broken stream after this long, e.g. 30s
    /// (default: one hour).
    #[arg(long, value_parser = duration::parse)]
    pub timeout: Option<std::time::Duration>,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Builds the kwargs object from `--kwargs-json` and `--kw` (which wins).
pub fn kwargs(json: Option<&str>, kw: &[String]) -> Result<Map<String, Value>, String> {
    let mut map = match json {
        None => Map::new(),
        Some(text) => {
            let text = match text.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path).map_err(|e| format!("--kwargs-json @{path}: {e}"))?,
                None => text.to_owned(),
            };
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => return Err("--kwargs-json must be a JSON object".into()),
                Err(e) => return Err(format!("--kwargs-json is not valid JSON: {e}")),
            }
        }
    };
    for pair in kw {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("--kw {pair:?}: expected KEY=VALUE"))?;
        if key.is_empty() {
            return Err(format!("--kw {pair:?}: the key is empty"));
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        map.insert(key.to_owned(), value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kw_values_are_json_when_they_parse_else_strings() {
        let kw = ["n=3", "f=0.5", "s=hello", "b=true", "o={\"a\":[1]}", "q=\"quoted\"", "e="].map(String::from);
        let map = kwargs(None, &kw).expect("kwargs");
        assert_eq!(
            Value::Object(map),
            json!({"n": 3, "f": 0.5, "s": "hello", "b": true, "o": {"a": [1]}, "q": "quoted", "e": ""})
        );
    }

    #[test]
    fn kwargs_json_merges_under_kw_and_rejects_garbage() {
        let map = kwargs(Some(r#"{"a": 1, "b": 2}"#), &["b=3".into()]).expect("kwargs");
        assert_eq!(Value::Object(map), json!({"a": 1, "b": 3}));
        assert!(kwargs(Some("{nope"), &[]).is_err());
        assert!(kwargs(Some("[1]"), &[]).is_err());
        assert!(kwargs(None, &["novalue".into()]).is_err());
        assert!(kwargs(Some("@/does/not/exist.json"), &[]).is_err());
    }
}
