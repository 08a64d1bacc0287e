//! The client's one error type: the gRPC code, the server's message, the call
//! id and how far the call got, said in one sentence a person understands.

use std::fmt;

use crate::proto::Phase;

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server could not be reached, or the connection broke.
    Connect,
    /// The server (or a proxy) answered with a gRPC status.
    Status,
    /// Something on this side failed: reading the payload, writing the result.
    Local,
    /// The server broke the protocol (e.g. data before the result).
    Protocol,
}

/// A failed call.
#[derive(Debug, Clone)]
pub struct CallError {
    /// Where it came from.
    pub kind: ErrorKind,
    /// The gRPC status code (UNKNOWN for local failures).
    pub code: tonic::Code,
    /// The server's (or the local) message.
    pub message: String,
    /// The call id, when the server had accepted the call.
    pub call_id: Option<String>,
    /// The function called.
    pub func: String,
    /// The phase the call failed in: as the server reports it with the
    /// failure (`x-aipod-phase`), else the last phase a heartbeat reported;
    /// `None` if the call was never accepted.
    pub phase: Option<Phase>,
    /// Attempts made.
    pub attempts: u32,
    /// The server said this refusal may be retried (`x-aipod-retryable`).
    pub retryable_hint: bool,
    /// Retrying cannot fix it (a host name that does not resolve).
    pub permanent: bool,
    /// The server or router the call went to.
    pub target: Option<String>,
    /// The runtime itself ended the accepted call with this status (it
    /// carried `x-aipod-phase`); a status without it, once a call was
    /// accepted, came from a proxy or a broken connection.
    pub reported: bool,
}

impl CallError {
    /// An error of `kind` with a code and message.
    pub fn new(kind: ErrorKind, code: tonic::Code, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
            call_id: None,
            func: String::new(),
            phase: None,
            attempts: 1,
            retryable_hint: false,
            permanent: false,
            target: None,
            reported: false,
        }
    }

    /// A local failure (files, encoding).
    pub fn local(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Local, tonic::Code::Unknown, message)
    }

    /// From a gRPC status, telling connection failures apart: a server that
    /// cannot be reached (with the operating system's reason), and a
    /// connection lost mid-call (UNAVAILABLE, not an UNKNOWN "h2 protocol
    /// error" that reads like a model failure).
    pub fn from_status(status: &tonic::Status) -> Self {
        let chain = error_chain(status);
        let connect = status.code() == tonic::Code::Unavailable
            && std::error::Error::source(status).is_some_and(|s| s.to_string().contains("transport"))
            || status.message().contains("tcp connect error")
            || status.message().contains("transport error");
        let lost = !connect
            && status.code() == tonic::Code::Unknown
            && ["h2 protocol error", "connection reset", "broken pipe", "error reading a body from connection"]
                .iter()
                .any(|s| chain.to_ascii_lowercase().contains(s));
        // The server refused the request's metadata (h2 answers an
        // oversized header list with HTTP 431, which tonic can only report
        // as UNKNOWN): say what it was and what to shorten.
        let headers_too_large = status.code() == tonic::Code::Unknown && chain.contains("HTTP status code 431");
        let mut e = if headers_too_large {
            Self::new(
                ErrorKind::Protocol,
                tonic::Code::InvalidArgument,
                "the server refused the call's metadata as too large (HTTP 431 Request Header Fields Too Large): \
                 shorten the function name, upstream, call id or token",
            )
        } else if connect {
            let mut e = Self::new(ErrorKind::Connect, status.code(), chain.clone());
            e.permanent = chain.contains("dns error") || chain.contains("failed to lookup address");
            e
        } else if lost {
            Self::new(
                ErrorKind::Status,
                tonic::Code::Unavailable,
                format!("the connection to the server was lost ({chain})"),
            )
        } else {
            Self::new(ErrorKind::Status, status.code(), status.message())
        };
        e.retryable_hint = status
            .metadata()
            .get(crate::contract::RETRYABLE_KEY)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true");
        // Where the server says the call failed wins over the last heartbeat.
        e.phase = status
            .metadata()
            .get(crate::contract::PHASE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Phase::from_str_name(&format!("PHASE_{v}")))
            .filter(|p| *p != Phase::Unspecified);
        e.reported = e.phase.is_some();
        e
    }

    /// The gRPC code's canonical name, e.g. `NOT_FOUND`.
    pub fn code_name(&self) -> &'static str {
        code_name(self.code)
    }
}

/// The status message and every underlying cause, `a: b: c`, without
/// repeats (tonic and hyper nest the same text).
fn error_chain(status: &tonic::Status) -> String {
    let mut parts: Vec<String> = vec![status.message().to_owned()];
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

/// The canonical name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn phase_words(phase: Option<Phase>) -> &'static str {
    match phase {
        None => "before the server accepted it",
        Some(Phase::Unspecified | Phase::Receiving) => "while the server received the payload",
        Some(Phase::Queued) => "while it waited in the queue",
        Some(Phase::Running) => "while the model ran",
        Some(Phase::Sending) => "while the result was sent",
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let func = if self.func.is_empty() { "the call".to_owned() } else { format!("call to {:?}", self.func) };
        let id = self.call_id.as_ref().map(|id| format!(" (call id {id})")).unwrap_or_default();
        let tries = if self.attempts > 1 { format!(" after {} attempts", self.attempts) } else { String::new() };
        match self.kind {
            ErrorKind::Connect => {
                let server = self.target.as_deref().unwrap_or("the server");
                write!(f, "{func} could not reach {server}{tries}: {}", self.message)
            }
            ErrorKind::Local => write!(f, "{func} failed here{id}: {}", self.message),
            ErrorKind::Protocol => write!(f, "{func}{id} got a malformed answer: {}", self.message),
            ErrorKind::Status => {
                write!(
                    f,
                    "{func}{id} failed with {} {}{tries}: {}",
                    self.code_name(),
                    phase_words(self.phase),
                    self.message
                )
            }
        }
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_readable_sentence() {
        let mut e = CallError::new(ErrorKind::Status, tonic::Code::Unimplemented, "function \"x\" is not served");
        e.func = "x".into();
        e.call_id = Some("abc".into());
        assert_eq!(
            e.to_string(),
            r#"call to "x" (call id abc) failed with UNIMPLEMENTED before the server accepted it: function "x" is not served"#
        );
        e.phase = Some(Phase::Running);
        e.attempts = 3;
        assert!(e.to_string().contains("while the model ran after 3 attempts"));
    }

    #[test]
    fn retryable_hint_comes_from_status_metadata() {
        let mut status = tonic::Status::resource_exhausted("busy");
        status
            .metadata_mut()
            .insert(crate::contract::RETRYABLE_KEY, tonic::metadata::MetadataValue::from_static("true"));
        assert!(CallError::from_status(&status).retryable_hint);
        assert!(!CallError::from_status(&tonic::Status::resource_exhausted("too big")).retryable_hint);
    }
}
