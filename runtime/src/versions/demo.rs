//! The built-in demo model (`builtin:demo`): small functions that exercise
//! every part of the runtime — payload in and out, hashing while the upload
//! streams, progress, cancellation and errors.

use std::{io::Read, time::Duration};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    code::ErrorCode,
    code::ModelError,
    model::{BoxFuture, Kwargs, Model, ModelCall, ModelOutput, Tap},
};

/// The demo model's functions.
pub(crate) const FUNCTIONS: [&str; 6] = ["chaos", "discard", "echo", "fail", "sha256", "sleep"];

/// The longest `sleep` accepted, so a typo cannot pin a slot for days.
const MAX_SLEEP_SECS: f64 = 24.0 * 3600.0;

/// The built-in demo model.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Demo;

impl Model for Demo {
    fn functions(&self) -> Vec<String> {
        FUNCTIONS.iter().map(|f| (*f).to_owned()).collect()
    }

    fn serves(&self, func: &str) -> bool {
        FUNCTIONS.binary_search(&func).is_ok()
    }

    fn tap(&self, func: &str, _kwargs: &Kwargs) -> Option<Box<dyn Tap>> {
        match func {
            "sha256" => Some(Box::new(HashTap::default())),
            "discard" => Some(Box::new(CountTap::default())),
            _ => None,
        }
    }

    fn call(&self, call: ModelCall) -> BoxFuture<Result<ModelOutput, ModelError>> {
        Box::pin(async move {
            match call.func.as_str() {
                "echo" | "chaos" => echo(call),
                "discard" => Ok(ModelOutput::json(call.tapped.unwrap_or_else(|| json!({ "size": call.input_size })))),
                "sha256" => sha256(call).await,
                "sleep" => sleep(call).await,
                "fail" => Err(fail(&call.kwargs)),
                other => Err(ModelError::new(ErrorCode::Unimplemented, format!("demo has no function {other:?}"))),
            }
        })
    }
}

/// Result: the kwargs and the payload size; result payload: the input.
fn echo(call: ModelCall) -> Result<ModelOutput, ModelError> {
    // The input itself goes back — the same bytes or the same file: nothing
    // is copied or linked.
    Ok(ModelOutput::with_payload(json!({ "kwargs": call.kwargs, "size": call.input_size }), call.input.into_result()))
}

/// Result: `{"sha256", "size"}` of the payload, hashed while it streamed in.
async fn sha256(call: ModelCall) -> Result<ModelOutput, ModelError> {
    if let Some(tapped) = call.tapped {
        return Ok(ModelOutput::json(tapped));
    }
    let input = call.input;
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<Value> {
        let mut tap = HashTap::default();
        let mut file = input.open()?;
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            tap.write(&buf[..n]);
        }
        Ok(Box::new(tap).finish())
    })
    .await
    .map_err(|e| ModelError::internal(e.to_string()))?
    .map_err(|e| ModelError::internal(format!("reading the payload: {e}")))?;
    Ok(ModelOutput::json(hashed))
}

/// Sleeps `seconds` (default 1), reporting progress; stops early when the
/// call is cancelled.
async fn sleep(call: ModelCall) -> Result<ModelOutput, ModelError> {
    let seconds = match call.kwargs.get("seconds") {
        None => 1.0,
        Some(v) => v.as_f64().filter(|s| (0.0..=MAX_SLEEP_SECS).contains(s)).ok_or_else(|| {
            ModelError::invalid_argument(format!("seconds must be a number from 0 to {MAX_SLEEP_SECS}, got {v}"))
        })?,
    };
    let total = Duration::from_secs_f64(seconds);
    let start = tokio::time::Instant::now();
    // Progress rises by itself, computed as each heartbeat goes out: the
    // call does not wake until it ends (ten thousand sleeping calls would
    // otherwise wake ten thousand times a second).
    call.progress.linear(total, format!("sleeping {seconds}s"));
    tokio::select! {
        () = call.cancel.cancelled() => {
            let elapsed = start.elapsed().as_secs_f64();
            return Err(ModelError::new(ErrorCode::Cancelled, format!("sleep cancelled after {elapsed:.1}s")));
        }
        () = tokio::time::sleep_until(start + total) => {}
    }
    call.progress.report(Some(1.0), format!("slept {seconds}s"));
    Ok(ModelOutput::json(json!({ "slept": seconds })))
}

/// Fails with kwargs `code` (a gRPC code name, default INTERNAL) and `message`.
fn fail(kwargs: &Kwargs) -> ModelError {
    let code = match kwargs.get("code") {
        None => ErrorCode::Internal,
        Some(Value::String(name)) => match name.parse() {
            Ok(code) => code,
            Err(e) => return ModelError::invalid_argument(format!("fail: {e}")),
        },
        Some(other) => return ModelError::invalid_argument(format!("fail: code must be a string, got {other}")),
    };
    let message = kwargs.get("message").and_then(Value::as_str).unwrap_or("failed as asked");
    ModelError::new(code, message)
}

/// Hashes the payload as it streams in.
#[derive(Default)]
struct HashTap {
    hasher: Sha256,
    size: u64,
}

impl Tap for HashTap {
    fn write(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }

    fn finish(self: Box<Self>) -> Value {
        let digest = self.hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        json!({ "sha256": hex, "size": self.size })
    }

    /// The hash is all `sha256` needs: the payload is not spooled.
    fn needs_file(&self) -> bool {
        false
    }
}

/// Counts the payload as it streams in, for `discard`: the transport's
/// ceiling, with nothing written to disk.
#[derive(Default)]
struct CountTap {
    size: u64,
}

impl Tap for CountTap {
    fn write(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
    }

    fn finish(self: Box<Self>) -> Value {
        json!({ "size": self.size })
    }

    fn needs_file(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tap_matches_known_digest() {
        let mut tap = HashTap::default();
        tap.write(b"ab");
        tap.write(b"c");
        assert_eq!(
            Box::new(tap).finish(),
            json!({"sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "size": 3})
        );
    }

    #[test]
    fn fail_uses_the_requested_code() {
        let kw = |v: Value| v.as_object().cloned().expect("object");
        let e = fail(&kw(json!({"code": "FAILED_PRECONDITION", "message": "no"})));
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::FailedPrecondition, "no"));
        assert_eq!(fail(&kw(json!({}))).code, ErrorCode::Internal);
        assert_eq!(fail(&kw(json!({"code": "NOPE"}))).code, ErrorCode::InvalidArgument);
    }
}
