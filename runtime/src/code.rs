//! The vocabulary every layer shares, without depending on tonic: status
//! codes by their gRPC names (so models and the engine can say how a call
//! failed; `wire` maps them to the protocol), a model's own error, and the
//! phases of a call's life.

use std::{fmt, str::FromStr};

/// A non-OK gRPC status code, named as in the gRPC specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum ErrorCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl ErrorCode {
    /// Every code, in gRPC numbering order.
    pub const ALL: [ErrorCode; 16] = [
        Self::Cancelled,
        Self::Unknown,
        Self::InvalidArgument,
        Self::DeadlineExceeded,
        Self::NotFound,
        Self::AlreadyExists,
        Self::PermissionDenied,
        Self::ResourceExhausted,
        Self::FailedPrecondition,
        Self::Aborted,
        Self::OutOfRange,
        Self::Unimplemented,
        Self::Internal,
        Self::Unavailable,
        Self::DataLoss,
        Self::Unauthenticated,
    ];

    /// The canonical name, e.g. `FAILED_PRECONDITION`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The gRPC number (1..=16).
    pub fn number(self) -> i32 {
        Self::ALL.iter().position(|c| *c == self).map_or(2, |i| i as i32 + 1)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a non-OK gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a gRPC status code name (expected e.g. FAILED_PRECONDITION)")]
pub struct UnknownCode(String);

impl FromStr for ErrorCode {
    type Err = UnknownCode;

    /// Accepts canonical names in any case, with or without `-`/`_`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase().replace('-', "_");
        Self::ALL.into_iter().find(|c| c.name() == wanted).ok_or_else(|| UnknownCode(s.to_owned()))
    }
}

/// A model's own error: a status code of its choosing and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    /// The status code the client sees.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ModelError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// An INVALID_ARGUMENT error, for bad kwargs.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// An INTERNAL error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Receiving the payload.
    Receiving,
    /// Waiting for a free model slot.
    Queued,
    /// The model is working.
    Running,
    /// Sending the result payload.
    Sending,
}

impl Phase {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Receiving,
            1 => Self::Queued,
            2 => Self::Running,
            _ => Self::Sending,
        }
    }

    /// Its name in metrics and logs.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Sending => "sending",
        }
    }

    /// The name of its trace span.
    pub(crate) fn span_name(self) -> &'static str {
        match self {
            Self::Receiving => "aipod.receive",
            Self::Queued => "aipod.queue",
            Self::Running => "aipod.run",
            Self::Sending => "aipod.send",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_numbers_match_grpc() {
        for code in ErrorCode::ALL {
            assert_eq!(code.name().parse::<ErrorCode>(), Ok(code));
        }
        assert_eq!("failed-precondition".parse::<ErrorCode>(), Ok(ErrorCode::FailedPrecondition));
        assert_eq!(ErrorCode::Cancelled.number(), 1);
        assert_eq!(ErrorCode::FailedPrecondition.number(), 9);
        assert_eq!(ErrorCode::Unauthenticated.number(), 16);
        assert!("OK".parse::<ErrorCode>().is_err());
    }
}
