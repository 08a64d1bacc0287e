//! A call as the engine sees it: what the gRPC edge made of the header and
//! the call's metadata, in the engine's own terms.

use std::time::{Duration, Instant};

use crate::{engine::payload::PayloadSpec, model::Kwargs};

/// A call before admission.
#[derive(Debug, Clone)]
pub(crate) struct CallRequest {
    /// Correlation id; the engine makes one when the client sent none.
    pub(crate) call_id: String,
    /// The function to run.
    pub(crate) func: String,
    /// The model version; empty for the default until admitted.
    pub(crate) version: String,
    /// The function's keyword arguments.
    pub(crate) kwargs: Kwargs,
    /// What the header says about the payload.
    pub(crate) payload: PayloadSpec,
    /// When the client stops waiting (its `grpc-timeout`), if it set one.
    pub(crate) deadline: Option<Instant>,
    /// How long the client asked the call to be retained without it.
    pub(crate) retain: Option<Duration>,
    /// The offset a resumed upload continues from.
    pub(crate) resume_from: Option<u64>,
}
