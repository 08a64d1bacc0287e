//! The runtime's one error type: start-up failures and every way a call can
//! fail, each with the status code the client sees.

use std::{io, path::PathBuf};

use crate::code::{ErrorCode, ModelError};

/// Convenience alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- start-up ----
    /// A flag or environment variable has a value the runtime cannot use.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The spool directory cannot be created, locked or cleaned.
    #[error("spool directory {path}: {source}")]
    Spool {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The spool directory exists (or cannot be made) but this user may not
    /// write it: the classic non-root container whose volume is root-owned.
    #[error(
        "spool directory {path} is not writable by user id {uid}: mount a volume there that this user can \
         write (in Kubernetes an emptyDir, with the pod's fsGroup) or point --spool-dir (AIPOD_SPOOL_DIR) at a \
         directory it can write"
    )]
    SpoolNotWritable {
        /// The directory.
        path: PathBuf,
        /// The runtime's user id.
        uid: u32,
    },
    /// Another runtime holds the spool directory.
    #[error("spool directory {0} is in use by another aipod-runtime; give each runtime its own --spool-dir")]
    SpoolInUse(PathBuf),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// What failed.
        source: io::Error,
    },
    /// A model version could not start (a worker that never became ready).
    #[error("model version {version:?} failed to start: {message}")]
    Startup {
        /// The version.
        version: String,
        /// Why.
        message: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),

    // ---- a call ----
    /// No bearer token, or not one of `--auth-token-file`'s.
    #[error("missing or invalid credentials: send `authorization: Bearer <token>` with a token this server accepts")]
    Unauthenticated,
    /// The token may not call this function.
    #[error("this token may not call function {:?}", echo(.0))]
    PermissionDenied(String),
    /// The request is malformed (no header first, a second header, bad JSON…).
    #[error("{0}")]
    InvalidArgument(String),
    /// The function is not served by the version.
    #[error("function {:?} is not served by model version {version:?}; it serves: {available}", echo(func))]
    UnknownFunction {
        /// The function asked for.
        func: String,
        /// The version that was looked in.
        version: String,
        /// The functions that exist, comma separated.
        available: String,
    },
    /// No such model version.
    #[error("model version {:?} does not exist; versions: {available}", echo(version))]
    UnknownVersion {
        /// The version asked for.
        version: String,
        /// The versions that exist, comma separated.
        available: String,
    },
    /// The payload is not what the header promised, or not valid zstd.
    #[error("{0}")]
    DataLoss(String),
    /// A hard limit was hit (payload or message size): retrying cannot help.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A passing shortage (queue full, spool disk full): the same call may
    /// succeed later or on another replica.
    #[error("{0}")]
    Busy(String),
    /// The version cannot take calls now: its workers are starting or
    /// restarting.
    #[error("model version {0:?} is not ready: its workers are starting or restarting; retry shortly")]
    NotReady(String),
    /// The server is draining and takes no new calls.
    #[error("server is shutting down and accepts no new calls; retry on another replica")]
    Draining,
    /// The client went away or cancelled.
    #[error("call cancelled by the client")]
    Cancelled,
    /// The client's deadline passed before the call ended.
    #[error("the call's deadline passed before it finished")]
    DeadlineExceeded,
    /// The call outlived the server's `--max-call-duration`.
    #[error(
        "the call ran longer than this server's --max-call-duration of {} and was ended (an AIPod's \
         spec.runtime.maxCallDuration)",
        aipod::duration::format(*.0)
    )]
    CallTooLong(std::time::Duration),
    /// The server shut down (its drain timeout passed) before the call ended.
    #[error("the server shut down before the call finished (its --drain-timeout passed); the call was ended")]
    ShutDown,
    /// The client sent nothing for too long while uploading.
    #[error(
        "no payload data arrived for {} (--receive-timeout): the call was ended and its upload discarded",
        aipod::duration::format(*.0)
    )]
    ReceiveTimeout(std::time::Duration),
    /// The call cannot be served as asked in the client's situation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The client sent a header or a message too slowly (the inbound
    /// bounds).
    #[error("{0}")]
    TooSlow(String),
    /// The model failed in a way it did not choose.
    #[error("model crashed: {0}")]
    ModelCrashed(String),
    /// The model reported its own error.
    #[error("{0}")]
    Model(#[from] ModelError),
    /// Something in the runtime itself went wrong.
    #[error("internal error: {0}")]
    Internal(String),

    // ---- a retained call ----
    /// No retained call with this id for this identity.
    #[error(
        "no retained call {:?} on this server: it was never retained, its retain time passed, another identity \
         started it, or another replica (or a restarted runtime) holds it",
        echo(.0)
    )]
    NoRetainedCall(String),
    /// The retained call's upload is not complete: resume it instead.
    #[error(
        "the upload of retained call {:?} is incomplete: the server holds {held} bytes; resume it (chaos with \
         resume_from) instead of attaching",
        echo(call_id)
    )]
    UploadIncomplete {
        /// The call.
        call_id: String,
        /// Decoded bytes the server holds.
        held: u64,
    },
    /// The call cannot go on now, for the reason given; the client may try
    /// again (a retained call's interrupted upload, to be resumed).
    #[error("{0}")]
    Unavailable(String),
    /// Another request took the call over.
    #[error("{0}")]
    Aborted(String),
    /// A retained call's failure, told again to a client that attached later.
    #[error("{message}")]
    RetainedFailure {
        /// The failure's status code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

/// The longest message a status carries, and a log line repeats: whatever
/// a model or a client put in it, it stays small.
pub(crate) const MESSAGE_MAX: usize = 1024;

impl Error {
    /// The message as clients see it (and logs show it): cut to
    /// [`MESSAGE_MAX`] bytes on a character boundary.
    pub(crate) fn message(&self) -> String {
        let mut message = self.to_string();
        if message.len() > MESSAGE_MAX {
            let cut = (0..=MESSAGE_MAX).rev().find(|i| message.is_char_boundary(*i)).unwrap_or(0);
            message.truncate(cut);
            message.push_str("… (truncated)");
        }
        message
    }

    /// The status code a client sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) | Self::Config(_) => ErrorCode::InvalidArgument,
            Self::Unauthenticated => ErrorCode::Unauthenticated,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::UnknownFunction { .. } => ErrorCode::Unimplemented,
            Self::UnknownVersion { .. } => ErrorCode::NotFound,
            Self::DataLoss(_) => ErrorCode::DataLoss,
            Self::ResourceExhausted(_) | Self::Busy(_) => ErrorCode::ResourceExhausted,
            Self::Draining | Self::NotReady(_) | Self::ShutDown => ErrorCode::Unavailable,
            Self::Cancelled => ErrorCode::Cancelled,
            Self::DeadlineExceeded | Self::ReceiveTimeout(_) | Self::CallTooLong(_) | Self::TooSlow(_) => {
                ErrorCode::DeadlineExceeded
            }
            Self::Model(e) => e.code,
            Self::NoRetainedCall(_) => ErrorCode::NotFound,
            Self::UploadIncomplete { .. } | Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Aborted(_) => ErrorCode::Aborted,
            Self::RetainedFailure { code, .. } => *code,
            Self::ModelCrashed(_)
            | Self::Internal(_)
            | Self::Spool { .. }
            | Self::SpoolInUse(_)
            | Self::SpoolNotWritable { .. }
            | Self::Bind { .. }
            | Self::Startup { .. }
            | Self::Serve(_) => ErrorCode::Internal,
        }
    }

    /// Whether a client may send the same call again: the server refused it
    /// for a passing reason, before any model work.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Draining | Self::Busy(_) | Self::NotReady(_) | Self::Unavailable(_))
    }

    /// Maps an I/O error on the spool to the right status: a full disk is
    /// RESOURCE_EXHAUSTED, anything else INTERNAL.
    pub fn spool_io(context: &str, e: io::Error) -> Self {
        if is_disk_full(&e) {
            Self::Busy(format!("spool disk is full while {context}: {e}"))
        } else if e.raw_os_error() == Some(24) || e.raw_os_error() == Some(23) {
            // EMFILE / ENFILE: too many open files, a passing shortage.
            Self::Busy(format!("the server is out of file descriptors while {context}; retry later: {e}"))
        } else {
            Self::Internal(format!("spool I/O failed while {context}: {e}"))
        }
    }
}

/// What a client sent, as error messages repeat it: at most [`ECHO_MAX`]
/// characters, so a hostile name cannot blow up the status it gets back.
pub(crate) fn echo(input: &str) -> String {
    // Control characters escaped: a newline in a function name must not
    // forge a line in a text log.
    let shown = |s: &str| {
        s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect::<String>()
    };
    match input.char_indices().nth(ECHO_MAX) {
        None => shown(input),
        Some((cut, _)) => format!("{}… ({} bytes)", shown(&input[..cut]), input.len()),
    }
}

/// Characters of client input an error message repeats.
const ECHO_MAX: usize = 64;

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_input_is_echoed_short() {
        assert_eq!(echo("predict"), "predict");
        let long = echo(&"é".repeat(1000));
        assert!(long.starts_with(&"é".repeat(64)) && long.ends_with("… (2000 bytes)"), "{long}");
        assert_eq!(echo("f\nINFO forged\r\t"), "f\\nINFO forged\\r\\t", "control characters escaped");
    }

    #[test]
    fn running_out_of_descriptors_is_a_retryable_refusal() {
        for errno in [23, 24] {
            let e = Error::spool_io("creating the input file", io::Error::from_raw_os_error(errno));
            assert!(matches!(e, Error::Busy(_)) && e.retryable(), "{e}");
            assert_eq!(e.code(), ErrorCode::ResourceExhausted);
        }
        assert!(matches!(Error::spool_io("x", io::Error::other("odd")), Error::Internal(_)));
    }
}
