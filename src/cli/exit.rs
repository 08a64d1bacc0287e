//! Exit codes of the `aipod` CLI: one per failure class, so scripts can tell
//! "fix your request" from "try again later".

use crate::client::{CallError, ErrorKind};

/// The documented exit codes (also in `aipod --help` and the README).
pub const TABLE: &str = "\
Exit codes:
   0  success
   2  usage error (bad flags, bad kwargs JSON)
   3  cannot reach the server
   4  request rejected as invalid (INVALID_ARGUMENT, OUT_OF_RANGE)
   5  no such function or version (UNIMPLEMENTED, NOT_FOUND)
   6  payload damaged in transit (DATA_LOSS)
   7  a limit was hit (RESOURCE_EXHAUSTED)
   8  server unavailable or draining (UNAVAILABLE)
   9  cancelled or deadline exceeded (CANCELLED, DEADLINE_EXCEEDED)
  10  the model refused (FAILED_PRECONDITION, ABORTED, ALREADY_EXISTS,
      PERMISSION_DENIED, UNAUTHENTICATED)
  11  the server or model failed (INTERNAL, UNKNOWN)
  12  local file error (payload unreadable, --out not writable)
  13  the server broke the protocol";

/// Usage errors.
pub const USAGE: u8 = 2;

/// The exit code for a failed call.
pub fn code(e: &CallError) -> u8 {
    use tonic::Code::*;
    match e.kind {
        ErrorKind::Connect => 3,
        ErrorKind::Local => 12,
        ErrorKind::Protocol => 13,
        ErrorKind::Status => match e.code {
            InvalidArgument | OutOfRange => 4,
            Unimplemented | NotFound => 5,
            DataLoss => 6,
            ResourceExhausted => 7,
            Unavailable => 8,
            Cancelled | DeadlineExceeded => 9,
            FailedPrecondition | Aborted | AlreadyExists | PermissionDenied | Unauthenticated => 10,
            Internal | Unknown | Ok => 11,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_documented_class() {
        let status = |c| CallError::new(ErrorKind::Status, c, "");
        assert_eq!(code(&status(tonic::Code::Unimplemented)), 5);
        assert_eq!(code(&status(tonic::Code::NotFound)), 5);
        assert_eq!(code(&status(tonic::Code::DataLoss)), 6);
        assert_eq!(code(&status(tonic::Code::FailedPrecondition)), 10);
        assert_eq!(code(&CallError::new(ErrorKind::Connect, tonic::Code::Unavailable, "")), 3);
        assert_eq!(code(&CallError::local("")), 12);
        for n in [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] {
            assert!(TABLE.contains(&format!("{n:>4}  ")), "{n} documented");
        }
    }
}
