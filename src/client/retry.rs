//! When a failed call may be sent again, and how long to wait first.
//!
//! gRPC's built-in retry policy cannot replay a multi-GB stream, so the
//! client retries itself: only calls the server refused before any model
//! work (draining, queue full, connection refused), only when the payload can
//! be read again, with exponential backoff. A call whose model may have
//! started is retried only when the caller marks it idempotent.

use std::time::Duration;

use crate::client::error::{CallError, ErrorKind};
use crate::proto::Phase;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Factor applied to the wait after each attempt.
    pub multiplier: f64,
    /// Longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, waiting 1 s, 2 s, 4 s, 8 s (at most 30 s).
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.saturating_sub(1).min(64) as i32);
        self.initial_backoff.mul_f64(factor).min(self.max_backoff)
    }
}

/// Whether `error` may be retried, given whether the payload can be sent
/// again and whether the caller declared the call idempotent.
pub fn should_retry(error: &CallError, replayable: bool, idempotent: bool) -> bool {
    if !replayable {
        return false;
    }
    let transient = match error.kind {
        ErrorKind::Connect => !error.permanent,
        ErrorKind::Status => match error.code {
            tonic::Code::Unavailable => true,
            tonic::Code::ResourceExhausted => error.retryable_hint,
            _ => false,
        },
        ErrorKind::Local | ErrorKind::Protocol => false,
    };
    let model_may_have_started = error.phase.is_some_and(|p| p >= Phase::Running);
    transient && (!model_may_have_started || idempotent)
}

/// Whether a retained call the server had accepted should be reattached
/// after `error`: a lost connection, a proxy's answer (a status without the
/// runtime's `x-aipod-phase`), or the runtime asking for a resume — never
/// the call's own outcome, which a reattach would only repeat.
pub fn should_rejoin(error: &CallError) -> bool {
    match error.kind {
        ErrorKind::Connect => !error.permanent,
        ErrorKind::Status => match error.code {
            tonic::Code::Unavailable => !error.reported || error.retryable_hint,
            tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => !error.reported,
            _ => false,
        },
        ErrorKind::Local | ErrorKind::Protocol => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, phase: Option<Phase>, hint: bool) -> CallError {
        CallError { code, phase, retryable_hint: hint, ..CallError::new(ErrorKind::Status, code, "x") }
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_thirty() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=7).map(|a| p.backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn refusals_before_the_model_runs_are_retried() {
        assert!(should_retry(&status(tonic::Code::Unavailable, None, false), true, false), "draining or refused");
        assert!(should_retry(&status(tonic::Code::ResourceExhausted, None, true), true, false), "queue full");
        assert!(should_retry(&status(tonic::Code::ResourceExhausted, Some(Phase::Queued), true), true, false));
        assert!(should_retry(&CallError::new(ErrorKind::Connect, tonic::Code::Unavailable, "refused"), true, false));
    }

    #[test]
    fn a_retained_call_is_rejoined_after_breakage_never_after_its_own_outcome() {
        let lost = CallError::new(ErrorKind::Status, tonic::Code::Unavailable, "connection lost");
        assert!(should_rejoin(&lost), "no x-aipod-phase: the transport or a proxy");
        let mut resume = status(tonic::Code::Unavailable, Some(Phase::Receiving), true);
        resume.reported = true;
        assert!(should_rejoin(&resume), "the runtime asks for a resume");
        let mut crashed = status(tonic::Code::Internal, Some(Phase::Running), false);
        crashed.reported = true;
        assert!(!should_rejoin(&crashed), "the model's own failure");
        assert!(!should_rejoin(&status(tonic::Code::NotFound, None, false)), "the call is not held there");
        assert!(should_rejoin(&CallError::new(ErrorKind::Connect, tonic::Code::Unavailable, "refused")));
        assert!(!should_rejoin(&CallError::local("disk full")));
    }

    #[test]
    fn final_answers_and_started_models_are_not_retried() {
        assert!(!should_retry(&status(tonic::Code::ResourceExhausted, None, false), true, false), "payload too large");
        assert!(!should_retry(&status(tonic::Code::InvalidArgument, None, false), true, false));
        assert!(!should_retry(&status(tonic::Code::Internal, None, false), true, false));
        assert!(
            !should_retry(&status(tonic::Code::Unavailable, Some(Phase::Running), false), true, false),
            "model ran"
        );
        assert!(
            should_retry(&status(tonic::Code::Unavailable, Some(Phase::Running), false), true, true),
            "unless idempotent"
        );
        assert!(!should_retry(&status(tonic::Code::Unavailable, None, false), false, false), "stdin cannot be re-read");
        assert!(!should_retry(&CallError::new(ErrorKind::Local, tonic::Code::Unknown, "no such file"), true, true));
    }
}
