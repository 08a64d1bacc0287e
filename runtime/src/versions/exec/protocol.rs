//! The worker protocol's messages: one JSON object per line, `"type"` first.
//! The runtime writes [`ToWorker`] to the worker's stdin and reads
//! [`FromWorker`] from its stdout. `docs/worker-protocol.md` is the
//! language-neutral description; this file is its reference.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{code::ErrorCode, model::Kwargs};

/// The protocol version this runtime speaks; a worker's `ready` must match.
pub(crate) const PROTOCOL: u32 = 1;

/// A message from the runtime to a worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ToWorker<'a> {
    /// Run one function. The worker runs one call at a time.
    Call {
        /// The call id; every reply about this call carries it.
        id: &'a str,
        /// The function to run (one the worker listed in `ready`).
        function: &'a str,
        /// Its keyword arguments.
        kwargs: &'a Kwargs,
        /// The decoded payload on disk (an empty file when there was none).
        input: &'a str,
        /// The payload's size in bytes.
        input_size: u64,
        /// A directory the worker may write a result file into.
        output_dir: &'a str,
        /// The W3C trace context to continue, when the call is traced.
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<&'a str>,
    },
    /// The client went away: stop the call and reply (any reply will do).
    Cancel {
        /// The call to stop.
        id: &'a str,
    },
    /// No more calls: release resources and exit.
    Shutdown,
}

/// A message from a worker to the runtime.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum FromWorker {
    /// The worker has loaded its model and takes calls.
    Ready {
        /// The protocol version the worker speaks.
        protocol: u32,
        /// The functions it serves.
        functions: Vec<String>,
    },
    /// Progress of the running call, shown in the client's heartbeats.
    Progress {
        /// The call.
        id: String,
        /// Fraction done, 0 to 1.
        #[serde(default)]
        fraction: Option<f32>,
        /// A short human message ("epoch 2/5").
        #[serde(default)]
        message: Option<String>,
    },
    /// A line for the runtime's log.
    Log {
        /// The call it is about, if any.
        #[serde(default)]
        id: Option<String>,
        /// `debug`, `info`, `warning` or `error` (default `info`).
        #[serde(default)]
        level: Option<String>,
        /// The text.
        message: String,
    },
    /// The call succeeded.
    Result {
        /// The call.
        id: String,
        /// The JSON result.
        #[serde(default)]
        result: Value,
        /// A result file inside the call's output dir, streamed back to the
        /// client.
        #[serde(default)]
        output: Option<String>,
    },
    /// The call failed with a status of the worker's choosing.
    Error {
        /// The call.
        id: String,
        /// A gRPC status code name, e.g. `FAILED_PRECONDITION`.
        code: String,
        /// What went wrong, for a person.
        message: String,
    },
}

impl FromWorker {
    /// Parses one line from a worker.
    pub(crate) fn parse(line: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(line).map_err(|e| {
            // serde's message quotes offending values whole: cut both.
            let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            format!(
                "not a worker protocol message ({}): {}",
                crate::error::echo(&e.to_string()),
                crate::error::echo(&format!("{shown:?}"))
            )
        })
    }

    /// The call a message is about, for messages that belong to one.
    pub(crate) fn call_id(&self) -> Option<&str> {
        match self {
            Self::Progress { id, .. } | Self::Result { id, .. } | Self::Error { id, .. } => Some(id),
            Self::Log { id, .. } => id.as_deref(),
            Self::Ready { .. } => None,
        }
    }
}

impl ToWorker<'_> {
    /// The message as one line, newline included.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every key is a string.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// Reads an error code sent by a worker; an unknown name becomes INTERNAL,
/// with the name kept in the message so nothing is lost.
pub(crate) fn error_code(name: &str, message: String) -> (ErrorCode, String) {
    match name.parse::<ErrorCode>() {
        Ok(code) => (code, message),
        Err(_) => (ErrorCode::Internal, format!("{message} (the worker sent an unknown status code {name:?})")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn runtime_messages_are_single_json_lines() {
        let kwargs = json!({"k": "a\nb"}).as_object().cloned().expect("object");
        let call_with = |traceparent| ToWorker::Call {
            id: "c1",
            function: "predict",
            kwargs: &kwargs,
            input: "/s/c1/input",
            input_size: 5,
            output_dir: "/s/c1/out",
            traceparent,
        };
        let call = call_with(None);
        let line = call.to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line, newline escaped inside");
        assert_eq!(
            serde_json::from_slice::<Value>(&line).expect("json"),
            json!({"type": "call", "id": "c1", "function": "predict", "kwargs": {"k": "a\nb"},
                   "input": "/s/c1/input", "input_size": 5, "output_dir": "/s/c1/out"})
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = call_with(Some(tp));
        assert_eq!(serde_json::from_slice::<Value>(&traced.to_line()).expect("json")["traceparent"], tp);
        assert_eq!(ToWorker::Cancel { id: "c1" }.to_line(), b"{\"type\":\"cancel\",\"id\":\"c1\"}\n");
        assert_eq!(ToWorker::Shutdown.to_line(), b"{\"type\":\"shutdown\"}\n");
    }

    #[test]
    fn worker_messages_parse_with_optional_fields() {
        assert_eq!(
            FromWorker::parse(br#"{"type":"ready","protocol":1,"functions":["a","b"]}"#),
            Ok(FromWorker::Ready { protocol: 1, functions: vec!["a".into(), "b".into()] })
        );
        assert_eq!(
            FromWorker::parse(br#"{"type":"progress","id":"c","fraction":0.5}"#),
            Ok(FromWorker::Progress { id: "c".into(), fraction: Some(0.5), message: None })
        );
        assert_eq!(
            FromWorker::parse(br#"{"type":"result","id":"c"}"#),
            Ok(FromWorker::Result { id: "c".into(), result: Value::Null, output: None })
        );
        let log = FromWorker::parse(br#"{"type":"log","message":"hi"}"#).expect("log");
        assert_eq!(log.call_id(), None);
        let err = FromWorker::parse(br#"{"type":"error","id":"c","code":"NOT_FOUND","message":"m"}"#).expect("err");
        assert_eq!(err.call_id(), Some("c"));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(FromWorker::parse(b"hello from print()").expect_err("bad").contains("hello from print()"));
        assert!(FromWorker::parse(br#"{"type":"dance"}"#).is_err());
        assert!(FromWorker::parse(br#"{"type":"error","id":"c"}"#).is_err(), "code and message are required");
    }

    #[test]
    fn unknown_codes_become_internal_and_keep_the_name() {
        assert_eq!(error_code("NOT_FOUND", "m".into()), (ErrorCode::NotFound, "m".into()));
        let (code, message) = error_code("TEAPOT", "m".into());
        assert_eq!(code, ErrorCode::Internal);
        assert!(message.contains("TEAPOT"));
    }
}
